#!/usr/bin/env bash
# Build the serving image from deploy/Dockerfile with buildah, run it under podman as a non-root user
# and check it for real: health SERVING, one Explain answered, uid != 0. Run from anywhere:
#
#   bash deploy/container_smoke.sh
#
# Steps (each prints one line of the transcript; full build/debootstrap logs go to $SMOKE_WORK):
#   base    the base image. Default: localhost/conceptlens-base:<suite>, a debootstrapped Debian
#           (minbase + python3, python3-venv, ca-certificates) imported into local container storage,
#           for machines where no registry is reachable. Made once (needs root), then reused.
#           BASE_IMAGE=python:3.11-slim (the Dockerfile's default) builds on that instead.
#   build   buildah bud --layers: steps whose inputs (content of the copied files, the commands,
#           the parent) are unchanged come from the layer cache, and the line says how many did;
#           SMOKE_NO_CACHE=1 rebuilds everything.
#   bundle  a tiny but real bundle (tests/service_conftest.write_tiny_bundle: an ONNX CNN of 10
#           classes, 8 with concepts), written on the host, mounted read-only at /bundle.
#   run     the image's own entrypoint/command (`conceptlens serve --bundle /bundle`) as uid 10001,
#           read-only root filesystem, all capabilities dropped, no-new-privileges (the Kubernetes
#           Deployment's securityContext); gRPC, HTTP and metrics published on free 127.0.0.1 ports.
#   check   from the host with the project's client: gRPC health SERVING, ListClasses, one Explain of a
#           PNG (10 predictions, 2 classes explained with their concepts, sum identity holds), /metrics,
#           `id -u` in the container and the image's User are non-root.
#   stop    SIGTERM: the server drains and must exit 0.
# The container is removed on success and on failure (trap). Exit status: 0 and "PASS: ..." when every
# check held, 1 and "FAIL: ..." when one did not, 3 and "SKIP: ..." when this machine cannot build or run
# containers at all (no buildah/podman, no OCI runtime that starts a container, no base image and no root).
#
# What this sandbox needed (Debian 12: buildah 1.28, podman 4.3, root, cgroup v1/v2 hybrid, a
# TLS-intercepting egress proxy, no CAP_SYS_RESOURCE) -- each is a default below, overridable:
#   * storage: the configured driver (overlay, native kernel overlayfs as root); buildah and podman
#     must share it. vfs would copy every ~700 MB layer per step.
#   * build isolation chroot (SMOKE_ISOLATION): RUN steps need no OCI runtime and use the host's
#     network, so pip reaches PyPI the way the host does; the least a host must offer. (oci isolation
#     fails with buildah's default crun, which refuses the hybrid cgroup layout; SMOKE_ISOLATION=oci
#     builds with the runtime probed for podman below, runc here, which works too.)
#   * OCI runtime for podman run (SMOKE_OCI_RUNTIME): probed; podman's default crun fails here with
#     "cgroups in hybrid mode not supported", runc (Debian package `runc`) works.
#   * explicit --ulimit nofile/nproc within the caller's hard limits: podman otherwise raises
#     RLIMIT_NOFILE/NPROC for the container, which needs CAP_SYS_RESOURCE.
#   * network: podman's default bridge (netavark) with published ports on 127.0.0.1, so parallel
#     runs and other servers never collide on 50051/8080/9090.
#   * pip in the build trusts the host's CA bundle (SMOKE_PIP_CA, `none` to skip): a pip.conf and the
#     bundle are bind-mounted into RUN steps only (/etc/xdg/pip), never committed to a layer.
#     The RUN --mount=type=cache of the Dockerfile works with buildah (/var/tmp/buildah-cache), but
#     the proxy here sends no caching headers, so pip caches nothing: a rebuild downloads again.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
SUITE="${DEBIAN_SUITE:-bookworm}"
LOCAL_BASE="localhost/conceptlens-base:$SUITE"
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
IMAGE="${SMOKE_IMAGE:-localhost/conceptlens:smoke}"
BUILD_IMAGE="$IMAGE-build"   # the build stage, tagged so its layers (the pip install) stay cached
WORK="${SMOKE_WORK:-/var/tmp/conceptlens-smoke}"
ISOLATION="${SMOKE_ISOLATION:-chroot}"
NAME="conceptlens-smoke-$$"
T0=$SECONDS
CONTAINER=""
TMP=""

say() { printf '%-10s %s\n' "[$1]" "$2"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
skip() { echo "SKIP: $*" >&2; exit 3; }  # this machine cannot build or run containers: nothing was tested
since() { echo "$(( SECONDS - $1 )) s"; }

cleanup() {
  local rc=$?
  if [ -n "$CONTAINER" ]; then
    if [ "$rc" != 0 ]; then
      echo "--- container log (last 30 lines) ---" >&2
      podman logs --tail 30 "$CONTAINER" >&2 2>&1 || true
    fi
    podman rm -f -t 2 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  [ -n "$TMP" ] && rm -rf "$TMP"
  [ -n "${ROOTFS:-}" ] && remove_rootfs "$ROOTFS"
  exit "$rc"
}
remove_rootfs() {  # a debootstrap interrupted midway may leave /proc, /sys mounted inside its target
  awk -v r="$1/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$1"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in buildah podman; do
  command -v "$tool" >/dev/null || skip "$tool is not installed (Debian: apt-get install buildah podman runc)"
done
[ -x "$PY" ] || fail "no Python at $PY (make install, or PYTHON=...)"
mkdir -p "$WORK"
TMP="$(mktemp -d)"
chmod 755 "$TMP"
DRIVER="$(podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null)" || skip "podman info fails: podman cannot run here"
echo "== conceptlens container smoke: $(buildah --version | cut -d' ' -f1-3), $(podman --version), storage $DRIVER, uid $(id -u)"

# ---- base ----------------------------------------------------------------------------------------
debian_mirror() {  # the machine's configured Debian mirror (one-line and deb822 sources)
  "$PY" - "$SUITE" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            f = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in f.get("Types", "").split() and suite in f.get("Suites", "").split() \
                    and "main" in f.get("Components", "").split():
                print(f["URIs"].split()[0]); sys.exit()
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
            if m and m.group(2) == suite and "main" in m.group(3).split():
                print(m.group(1)); sys.exit()
print("http://deb.debian.org/debian")
EOF
}

t=$SECONDS
if podman image exists "$BASE_IMAGE"; then
  say base "$BASE_IMAGE: reused from local storage ($(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12))"
elif [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then
  [ "$(id -u)" = 0 ] || skip "$LOCAL_BASE is missing and debootstrap needs root (or set BASE_IMAGE=python:3.11-slim)"
  command -v debootstrap >/dev/null || skip "debootstrap is not installed (apt-get install debootstrap)"
  MIRROR="${DEBIAN_MIRROR:-$(debian_mirror)}"
  ROOTFS="$(mktemp -d /var/tmp/conceptlens-rootfs.XXXXXX)"
  say base "debootstrap --variant=minbase $SUITE from $MIRROR (log: $WORK/debootstrap.log)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" \
      >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar --numeric-owner -C "$ROOTFS" -c . \
    | podman import --quiet --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
        - "$LOCAL_BASE" >/dev/null || fail "podman import of the debootstrapped root failed"
  remove_rootfs "$ROOTFS"; ROOTFS=""
  say base "$LOCAL_BASE: made ($(podman image inspect --format '{{.Id}}' "$LOCAL_BASE" | cut -c1-12)) in $(since "$t")"
else
  podman pull --quiet "$BASE_IMAGE" >/dev/null || fail "cannot pull $BASE_IMAGE (no registry reachable? leave BASE_IMAGE unset)"
  say base "$BASE_IMAGE: pulled ($(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12)) in $(since "$t")"
fi

# ---- OCI runtime (probed before the build: a machine that cannot run containers skips at once) -------
hard() { local v; v="$(ulimit -H "$1")"; if [ "$v" = unlimited ] || [ "$v" -gt "$2" ]; then echo "$2"; else echo "$v"; fi; }
nofile="$(hard -n 16384)"; nproc="$(hard -u 4096)"
run_args=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
# SMOKE_OCI_RUNTIME, else podman's default if it starts a container of the base image, else runc, else crun
runtime="${SMOKE_OCI_RUNTIME:-}"
rt=()
if [ -n "$runtime" ]; then
  rt=(--runtime "$runtime")
else
  : >"$WORK/runtime-probe.log"
  for candidate in default runc crun; do
    rt=()
    if [ "$candidate" != default ]; then
      command -v "$candidate" >/dev/null || continue
      rt=(--runtime "$candidate")
    fi
    if podman "${rt[@]}" run --rm "${run_args[@]}" "$BASE_IMAGE" true >/dev/null 2>>"$WORK/runtime-probe.log"; then
      runtime="$candidate"
      break
    fi
  done
  [ -n "$runtime" ] || { cat "$WORK/runtime-probe.log" >&2; skip "podman can start no container here (tried its default runtime, runc, crun)"; }
  [ "$runtime" = default ] && runtime="$(podman info --format '{{.Host.OCIRuntime.Name}}') (podman's default)"
fi

# ---- build ---------------------------------------------------------------------------------------
t=$SECONDS
ca="${SMOKE_PIP_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
build_args=(--layers --isolation "$ISOLATION" --ignorefile deploy/Dockerfile.dockerignore
            --build-arg "BASE_IMAGE=$BASE_IMAGE" -f deploy/Dockerfile)
if [ "$ca" != none ] && [ -f "$ca" ]; then
  mkdir -p "$WORK/pip"
  cmp -s "$ca" "$WORK/pip/ca.crt" || cp "$ca" "$WORK/pip/ca.crt"
  printf '[global]\ncert = /etc/xdg/pip/ca.crt\n' >"$WORK/pip/pip.conf"
  build_args+=(--volume "$WORK/pip:/etc/xdg/pip:ro")
fi
[ -n "${SMOKE_NO_CACHE:-}" ] && build_args+=(--no-cache)
[ "$ISOLATION" = oci ] && build_args+=("${rt[@]}")
old_image="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
old_build="$(podman image inspect --format '{{.Id}}' "$BUILD_IMAGE" 2>/dev/null || true)"
say build "buildah bud ${build_args[*]} -t $IMAGE . (log: $WORK/build.log)"
buildah bud "${build_args[@]}" --iidfile "$TMP/iid" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; fail "buildah bud failed (log: $WORK/build.log)"; }
# steps that can come from the cache (all but FROM), and those that did
steps="$(grep -E '^\[[0-9]+/[0-9]+\] STEP [0-9]+/[0-9]+: ' "$WORK/build.log" | grep -cvE 'STEP [0-9]+/[0-9]+: FROM ' || true)"
cached="$(grep -c '^--> Using cache ' "$WORK/build.log" || true)"
new_image="$(sed 's/^sha256://' "$TMP/iid")"  # this build's image (by id: the tag may move under a parallel run)
if [ "$cached" = "$steps" ] && [ "$new_image" = "$old_image" ] && [ -n "$old_build" ]; then
  verdict="reused: every step from the layer cache (inputs unchanged)"
else
  verdict="built: $((steps - cached)) of $steps steps run, $cached from the layer cache"
  # the build stage under a tag of its own (every step from the cache of the bud above), else nothing
  # refers to its layers and a cleanup would take the pip install out of the cache
  buildah bud "${build_args[@]}" --target build -t "$BUILD_IMAGE" . >"$WORK/build-stage.log" 2>&1 \
    || { tail -40 "$WORK/build-stage.log" >&2; fail "tagging the build stage failed (log: $WORK/build-stage.log)"; }
fi
new_build="$(podman image inspect --format '{{.Id}}' "$BUILD_IMAGE")"
say build "$verdict, in $(since "$t")"
# the previous smoke image's own layers (a changed source leaves ~700 MB behind otherwise); podman rmi
# also removes its untagged parents that nothing else uses
for old in "$old_image" "$old_build"; do
  if [ -n "$old" ] && [ "$old" != "$new_image" ] && [ "$old" != "$new_build" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
done
read -r img_id img_size img_user < <(podman image inspect --format '{{.Id}} {{.Size}} {{.Config.User}}' "$new_image")
img_cmd="$(podman image inspect --format '{{.Config.Entrypoint}} {{.Config.Cmd}}' "$new_image")"
say image "$IMAGE ${img_id:0:12}, $((img_size / 1000000)) MB, User $img_user, $img_cmd"
case "${img_user%%:*}" in ""|0|root) fail "the image's User is '${img_user}': it would run as root" ;; esac

# ---- bundle --------------------------------------------------------------------------------------
"$PY" - "$TMP/bundle" <<'EOF' || fail "could not write the tiny bundle"
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from service_conftest import write_tiny_bundle
write_tiny_bundle(Path(sys.argv[1]))
EOF
chmod -R a+rX "$TMP"  # the bundle writer makes 0600 files; the server runs as uid 10001
say bundle "tiny bundle (tests/service_conftest.py: 10 classes, 8 with concepts) at $TMP/bundle, read-only at /bundle"

# ---- run -----------------------------------------------------------------------------------------
t=$SECONDS
CONTAINER="$NAME"
podman "${rt[@]}" run -d --name "$NAME" "${run_args[@]}" --user 10001:10001 --read-only --cap-drop ALL \
    --security-opt no-new-privileges -v "$TMP/bundle:/bundle:ro" \
    -p 127.0.0.1::50051 -p 127.0.0.1::8080 -p 127.0.0.1::9090 "$new_image" >/dev/null \
    || fail "podman run failed"
port() { podman port "$NAME" "$1/tcp" | head -1 | sed 's/.*://'; }
GRPC="$(port 50051)"; HTTP="$(port 8080)"; METRICS="$(port 9090)"
say run "container $NAME: runtime $runtime, network bridge, 127.0.0.1:$GRPC->50051 (gRPC), :$HTTP->8080, :$METRICS->9090, nofile $nofile, nproc $nproc"

"$PY" - "$NAME" "127.0.0.1:$GRPC" "$METRICS" <<'EOF' || fail "the checks against the container failed (see above)"
import io, subprocess, sys, time, urllib.request
import grpc
import numpy as np
from PIL import Image
from conceptlens.service.client import ExplainClient, identity_gap

name, target, metrics_port = sys.argv[1], sys.argv[2], sys.argv[3]
def line(tag, text): print(f"{'[' + tag + ']':<10} {text}", flush=True)
def running():
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Status}}", name], capture_output=True, text=True)
    return out.stdout.strip()

t0 = time.monotonic()
with ExplainClient(target, timeout=30) as client:
    status = "?"
    while True:
        try:
            status = client.health(timeout=1.0)
        except grpc.RpcError as e:
            status = e.code().name
        if status == "SERVING":
            break
        if running() != "running":
            sys.exit(f"FAIL: the container is {running()} before health said SERVING")
        if time.monotonic() - t0 > 120:
            sys.exit(f"FAIL: health is {status} after 120 s")
        time.sleep(0.2)
    line("health", f"SERVING after {time.monotonic() - t0:.1f} s")
    classes = client.list_classes()
    with_concepts = sum(1 for c in classes.classes if c.has_concepts)
    line("classes", f"ListClasses: {len(classes.classes)} classes, {with_concepts} with concepts")
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, format="PNG")
    t1 = time.monotonic()
    answer = client.explain(buf.getvalue(), classes=[0, 3], num_predictions=10)
    ms = (time.monotonic() - t1) * 1000
    preds, expl = answer.predictions, answer.explanations
    top = preds[0]
    line("explain", f"PNG 160x120 in {ms:.0f} ms: bundle {answer.bundle_id}, {len(preds)} predictions "
                    f"(top {top.class_name} p={top.probability:.3f}), {len(expl)} classes explained")
    for x in expl:
        line("explain", f"  {x.class_name}: logit {x.logit:+.4f} = {len(x.concepts)} concepts "
                        f"{', '.join(f'{c.contribution:+.3f}' for c in x.concepts)} + bias/residual; "
                        f"identity gap {identity_gap(x):.1e}")
    problems = []
    if (len(classes.classes), with_concepts) != (10, 8):
        problems.append(f"ListClasses: {len(classes.classes)} classes, {with_concepts} with concepts; expected 10, 8")
    if len(preds) != 10:
        problems.append(f"{len(preds)} predictions, expected 10")
    if [x.class_id for x in expl] != [0, 3]:
        problems.append(f"explained {[x.class_id for x in expl]}, expected [0, 3]")
    if any(len(x.concepts) != 3 or identity_gap(x) > 1e-3 for x in expl):
        problems.append("an explanation lacks its 3 concepts or breaks the sum identity")
    if abs(sum(p.probability for p in preds) - 1) > 1e-3:
        problems.append("the probabilities of all 10 classes do not sum to 1")
    if problems:
        sys.exit("FAIL: " + "; ".join(problems))
text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
explains = [l for l in text.splitlines() if l.startswith("conceptlens_requests_total") and 'method="Explain"' in l]
line("metrics", f"/metrics: {len(text.splitlines())} lines; {explains[0] if explains else 'no Explain counter!'}")
if not explains:
    sys.exit("FAIL: /metrics does not count the Explain")
EOF

uid="$(podman exec "$NAME" id -u)" || fail "podman exec id -u failed"
[ "$uid" != 0 ] || fail "the server runs as root"
say user "id -u in the container: $uid (image User $img_user); root filesystem read-only, no capabilities"

t=$SECONDS
podman stop -t 30 "$NAME" >/dev/null || fail "podman stop failed"
code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
[ "$code" = 0 ] || fail "the server exited with $code after SIGTERM (expected a drain and 0)"
say stop "SIGTERM: drained and exited 0 in $(since "$t")"
podman rm "$NAME" >/dev/null && CONTAINER=""
echo "PASS: image $IMAGE (${img_id:0:12}) built from deploy/Dockerfile on $BASE_IMAGE serves as uid $uid; total $(since "$T0")"
