#!/usr/bin/env bash
# Render every Kubernetes stack of deploy/ and check it offline:
#   1. `kubectl kustomize` (kubectl's built-in kustomize) renders deploy/k8s (the base),
#      deploy/overlays/all-components (the base with every component on) and deploy/k8s/precompute;
#   2. deploy/check_manifests.py validates every rendered document, strictly, against the Kubernetes
#      OpenAPI schemas shipped in kubernetes-validate (1.30 and 1.37), the ServiceMonitor against the
#      CRD fields we use (deploy/k8s/components/servicemonitor/servicemonitor.schema.json);
#   3. checkov scans the rendered manifests and deploy/Dockerfile. Exceptions are made where they
#      apply, with their reasons: `checkov.io/skipN` annotations in the manifests, `# checkov:skip=`
#      comments in the Dockerfile. Any failed check fails this script.
#
#   deploy/check_manifests.sh [--install] [--no-checkov] [--out DIR]
#
# --install  creates the tools venvs first: .venv-tools (kubectl, kubernetes-validate, pip-audit:
#            deploy/tools-requirements.txt; what CI installs) and .venv-checkov (checkov, large: its
#            own venv so its pins touch nothing else). Nothing goes into the project's .venv.
# --no-checkov  steps 1 and 2 only.   --out DIR  keep the rendered manifests in DIR.
# Env: TOOLS_VENV, CHECKOV_VENV (venv paths), KUBECTL (a kubectl to use instead of the tools venv's),
#      K8S_VERSIONS (e.g. "1.30 1.37"), CHECKOV_FRAMEWORKS (default "kubernetes dockerfile"),
#      PYTHON (to create the venvs; default python3).
# Exit status: 0 all clean; 1 a render, validation or checkov failure; 2 a tool is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
TOOLS_VENV=${TOOLS_VENV:-.venv-tools}
CHECKOV_VENV=${CHECKOV_VENV:-.venv-checkov}
CHECKOV_VERSION=3.3.30
install=0 checkov=1 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install=1 ;;
    --no-checkov) checkov=0 ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$install" = 1 ]; then
  [ -x "$TOOLS_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$TOOLS_VENV" || exit 2
  "$TOOLS_VENV/bin/pip" install -q -r deploy/tools-requirements.txt || exit 2
  if [ "$checkov" = 1 ]; then
    [ -x "$CHECKOV_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$CHECKOV_VENV" || exit 2
    "$CHECKOV_VENV/bin/pip" install -q "checkov==$CHECKOV_VERSION" || exit 2
  fi
fi

KUBECTL=${KUBECTL:-$TOOLS_VENV/bin/kubectl}
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl || true)
if [ -z "$KUBECTL" ] || [ ! -x "$TOOLS_VENV/bin/python" ]; then
  echo "missing tools: kubectl='${KUBECTL:-none}', $TOOLS_VENV: run deploy/check_manifests.sh --install" >&2
  exit 2
fi
if [ "$checkov" = 1 ] && [ ! -x "$CHECKOV_VENV/bin/checkov" ]; then
  echo "checkov is not installed in $CHECKOV_VENV: run deploy/check_manifests.sh --install (or --no-checkov)" >&2
  exit 2
fi

if [ -z "$out" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/rendered"
rc=0
summary=()

# ---- 1. render ---------------------------------------------------------------------------------------
rendered=()
for stack in k8s overlays/all-components k8s/precompute; do
  file="$out/rendered/$(echo "$stack" | tr / -).yaml"
  if "$KUBECTL" kustomize "deploy/$stack" >"$file" 2>"$file.err"; then
    rendered+=("$file")
    summary+=("render     deploy/$stack: $(grep -c '^kind:' "$file") objects")
  else
    cat "$file.err" >&2
    summary+=("render     deploy/$stack: FAILED")
    rc=1
  fi
  rm -f "$file.err"
done

# ---- 2. schemas ---------------------------------------------------------------------------------------
versions=()
for v in ${K8S_VERSIONS:-}; do versions+=(-k "$v"); done
"$TOOLS_VENV/bin/python" deploy/check_manifests.py "${versions[@]}" "${rendered[@]}" >"$out/validate.txt"
vrc=$?
grep -v -e '^ok ' -e '^kubernetes-validate:' "$out/validate.txt"
[ "$vrc" = 0 ] || rc=1
summary+=("schemas    $(tail -n 1 "$out/validate.txt")")

# ---- 3. checkov -----------------------------------------------------------------------------------------
if [ "$checkov" = 1 ]; then
  mkdir -p "$out/checkov"
  # kubernetes: the rendered stacks; dockerfile: the images. No network: --skip-download.
  for framework in ${CHECKOV_FRAMEWORKS:-kubernetes dockerfile}; do
    if [ "$framework" = kubernetes ]; then target=(-d "$out/rendered"); else target=(-f deploy/Dockerfile); fi
    "$CHECKOV_VENV/bin/checkov" "${target[@]}" --framework "$framework" --skip-download --compact \
      -o cli -o json --output-file-path "$out/checkov" >"$out/checkov/$framework.txt" 2>"$out/checkov/$framework.err"
    crc=$?
    mv "$out/checkov/results_json.json" "$out/checkov/$framework.json" 2>/dev/null
    mv "$out/checkov/results_cli.txt" "$out/checkov/$framework.txt" 2>/dev/null
    line=$("$TOOLS_VENV/bin/python" - "$out/checkov/$framework.json" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("no report"); sys.exit(0)
for report in data if isinstance(data, list) else [data]:
    s = report.get("summary", {})
    print(f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped"
          f" (documented exceptions), {s.get('parsing_errors', 0)} parsing errors, checkov {s.get('checkov_version')}")
    for c in report.get("results", {}).get("failed_checks", []):
        print(f"             FAILED  {c['check_id']} {c['resource']} ({c['file_path'].lstrip('/')}): {c['check_name']}")
    seen = set()
    for c in report.get("results", {}).get("skipped_checks", []):
        key = (c["check_id"], c["resource"].split(".")[-1])  # one line per object, not per rendered stack
        if key not in seen:
            seen.add(key)
            print(f"             skipped {c['check_id']} {c['resource']}: {c['check_result'].get('suppress_comment')}")
EOF
)
    if [ "$crc" != 0 ]; then
      rc=1
      [ -s "$out/checkov/$framework.err" ] && tail -n 20 "$out/checkov/$framework.err" >&2
    fi
    summary+=("checkov    $framework: $line")
  done
fi

echo
echo "== deploy/check_manifests.sh summary =="
printf '%s\n' "${summary[@]}"
[ "$rc" = 0 ] && echo "result: OK" || echo "result: FAILED"
exit "$rc"
