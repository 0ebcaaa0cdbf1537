"""deploy/: images, Kubernetes manifests and the Grafana dashboard, checked offline against the real
CLI parsers and the real metrics registry (no Docker, no cluster, no network)."""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "conceptlens-dashboard.json"
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
# Tools outside the project's venv (deploy/tools-requirements.txt; `make audit` and .ci/run install them).
TOOLS_VENV = Path(os.environ.get("TOOLS_VENV", ROOT / ".venv-tools"))
KUBECTL = os.environ.get("KUBECTL") or (str(TOOLS_VENV / "bin" / "kubectl") if (TOOLS_VENV / "bin" / "kubectl").is_file()
                                         else shutil.which("kubectl"))


# ---- loading ---------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


DOCS = load_docs()


def containers() -> list[dict]:
    """Every container of every workload (base manifests and component patches alike)."""
    found = []
    for path, doc in DOCS:
        if doc.get("kind") not in WORKLOADS:
            continue
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) or []:
            found.append({"path": path, "kind": doc["kind"], "name": doc["metadata"]["name"], "doc": doc,
                          "pod": spec, "c": c})
    return found


def is_conceptlens(entry: dict) -> bool:
    image = entry["c"].get("image", "")
    return image.split("/")[-1].split(":")[0].startswith("conceptlens") or entry["base"] is not None


def with_base(entries: list[dict]) -> list[dict]:
    """Link a patch's container (no args) to the base container it patches (same kind/name/container)."""
    full = {(e["kind"], e["name"], e["c"]["name"]): e for e in entries if "args" in e["c"] or "command" in e["c"]}
    for e in entries:
        key = (e["kind"], e["name"], e["c"]["name"])
        e["base"] = full.get(key) if full.get(key) is not e else None
    return entries


CONTAINERS = with_base(containers())
CL_CONTAINERS = [e for e in CONTAINERS if is_conceptlens(e)]


def config_maps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for _, d in DOCS if d.get("kind") == "ConfigMap"}


def env_of(c: dict) -> dict[str, str]:
    env = {}
    cms = config_maps()
    for src in c.get("envFrom", []) or []:
        ref = src.get("configMapRef")
        assert ref and ref["name"] in cms, f"envFrom {src} names no ConfigMap of deploy/"
        env.update(cms[ref["name"]])
    for item in c.get("env", []) or []:
        env[item["name"]] = item["value"] if "value" in item else "from-" + next(iter(item["valueFrom"]))
    return env


def argv_of(entry: dict) -> list[str]:
    c = (entry["base"] or entry)["c"]
    argv = list(c.get("command", [])) + list(c.get("args", []))
    if argv and Path(argv[0]).name == "conceptlens":
        argv = argv[1:]  # ENTRYPOINT ["conceptlens"]: args are the subcommand line
    return argv


# ---- the real CLI ----------------------------------------------------------------------------------
def subcommand_parser(command: str):
    from conceptlens.service import cli

    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    importlib.import_module(cli.COMMANDS[command][0]).add_arguments(sub)
    return parser, sub


def env_names(sub) -> set[str]:
    """CONCEPTLENS_<FLAG> for every flag of the subcommand (as cli.apply_env_defaults reads them)."""
    names = {"CONCEPTLENS_LOG_LEVEL"}  # the top-level --log-level
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            names.add("CONCEPTLENS_" + max(action.option_strings, key=len).lstrip("-").upper().replace("-", "_"))
    return names


def parse_command(argv: list[str], env: dict[str, str]):
    """Parse like `conceptlens` does in the pod: env defaults first, then the command line."""
    from conceptlens.service import cli

    assert argv and argv[0] in cli.COMMANDS, f"not a conceptlens command: {argv}"
    parser, sub = subcommand_parser(argv[0])
    unknown = sorted(k for k in env if k.startswith("CONCEPTLENS_") and k not in env_names(sub))
    assert not unknown, f"`conceptlens {argv[0]}` has no flag for {unknown}"
    options = {o for a in sub._actions for o in a.option_strings}
    for token in argv[1:]:  # full flag names only: argparse would accept abbreviations
        assert not token.startswith("--") or token.split("=")[0] in options, f"{token} is no flag of {argv[0]}"
    cli.apply_env_defaults(sub, env)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`conceptlens {' '.join(argv)}` does not parse (env {env})")
    for action in sub._actions:  # argparse checks choices only for values given on the command line
        value = getattr(args, action.dest, None)
        if action.choices and value is not None:
            assert value in action.choices, f"{action.dest}={value!r} is not one of {action.choices}"
    return args


def expand(argv: list[str], env: dict[str, str], index: int = 0) -> list[str]:
    """Kubernetes $(VAR) expansion; JOB_COMPLETION_INDEX is set by the Job controller."""
    env = {**env, "JOB_COMPLETION_INDEX": str(index)}

    def one(arg: str) -> str:
        out = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        assert "$(" not in out, f"unresolved variable in {arg!r}"
        return out
    return [one(a) for a in argv]


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ---- YAML ------------------------------------------------------------------------------------------
def test_every_yaml_parses_and_names_its_kind():
    assert yaml_files(), "no YAML under deploy/"
    for path, doc in DOCS:
        assert isinstance(doc, dict) and doc.get("kind"), f"{path}: a document without kind"
        if doc["kind"] not in ("Kustomization", "Component"):
            assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']}"
    kinds = {d["kind"] for _, d in DOCS}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
                 "ServiceMonitor", "Kustomization", "Component", "PersistentVolumeClaim"):
        assert kind in kinds, kind


def test_kustomizations_reference_files_that_exist():
    for path, doc in DOCS:
        if doc["kind"] not in ("Kustomization", "Component"):
            continue
        refs = list(doc.get("resources", [])) + list(doc.get("components", []))
        refs += [p["path"] for p in doc.get("patches", []) if "path" in p]
        for ref in refs:
            target = path.parent / ref
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {ref} missing"
        for p in doc.get("patches", []):
            if "patch" in p:
                assert yaml.safe_load(p["patch"]), f"{path}: inline patch does not parse"
    # every manifest is reachable from a kustomization
    listed = set()
    for path, doc in DOCS:
        if doc["kind"] in ("Kustomization", "Component"):
            listed |= {(path.parent / r).resolve() for r in doc.get("resources", [])}
            listed |= {(path.parent / p["path"]).resolve() for p in doc.get("patches", []) if "path" in p}
    for path in yaml_files():
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization"


def test_env_values_and_config_map_data_are_strings():
    for e in CONTAINERS:
        for item in e["c"].get("env", []) or []:
            if "value" in item:
                assert isinstance(item["value"], str), f"{e['path']}: {item['name']} needs quotes"
    for name, data in config_maps().items():
        for k, v in data.items():
            assert isinstance(v, str), f"ConfigMap {name}: {k} needs quotes"


# ---- conceptlens command lines -----------------------------------------------------------------------
def test_every_conceptlens_command_line_parses_with_the_real_cli():
    commands = set()
    assert CL_CONTAINERS
    for e in CL_CONTAINERS:
        base_env = env_of(e["base"]["c"]) if e["base"] else {}
        env = {**base_env, **env_of(e["c"])}
        argv = argv_of(e)
        indexes = [0]
        if e["kind"] == "Job" and e["doc"]["spec"].get("completionMode") == "Indexed":
            indexes.append(e["doc"]["spec"]["completions"] - 1)
        for i in indexes:
            args = parse_command(expand(argv, env, i), env)
        commands.add(argv[0])
        if argv[0] == "serve":
            from conceptlens.service.config import ServerConfig

            ServerConfig.from_namespace(args).validate()
    assert {"serve", "precompute", "merge"} <= commands


def test_every_conceptlens_env_var_names_a_flag_of_its_command():
    for e in CL_CONTAINERS:
        command = argv_of(e)[0]
        _, sub = subcommand_parser(command)
        env = env_of(e["c"])
        bad = sorted(k for k in env if k.startswith("CONCEPTLENS_") and k not in env_names(sub))
        assert not bad, f"{e['path']}: `conceptlens {command}` has no flag for {bad}"


def server_container() -> dict:
    (e,) = [e for e in CL_CONTAINERS if e["kind"] == "Deployment" and not e["base"] and argv_of(e)[0] == "serve"]
    return e


def test_server_deployment_probes_drain_and_bundle():
    e = server_container()
    c, pod = e["c"], e["pod"]
    args = parse_command(argv_of(e), env_of(c))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == args.port == 50051 and ports["metrics"] == args.metrics_port == 9090
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == args.port, probe  # native gRPC probe on grpc.health.v1
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" or args.drain_delay_s > 0
    sleep = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > args.grace_s + args.drain_delay_s + sleep
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == args.bundle)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["cpu"] and c["resources"][kind]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the HPA, PDB and Services point at this Deployment's pods
    labels = e["doc"]["spec"]["template"]["metadata"]["labels"]
    for _, d in DOCS:
        if d["kind"] == "HorizontalPodAutoscaler":
            assert d["spec"]["scaleTargetRef"]["name"] == e["name"]
        if d["kind"] == "PodDisruptionBudget":
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if d["kind"] == "Service" and d["metadata"]["name"].startswith("conceptlens") and "redis" not in d["metadata"]["name"]:
            assert d["spec"]["selector"].items() <= labels.items()
            assert any(p["port"] == args.port for p in d["spec"]["ports"])


def test_gpu_and_tls_patches():
    patches = {e["path"].parent.name: e for e in CL_CONTAINERS if e["base"] is not None}
    gpu, tls = patches["gpu"]["c"], patches["tls"]["c"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu)["CONCEPTLENS_DEVICE"] == "cuda"
    env = env_of(tls)
    for var in ("CONCEPTLENS_TLS_CERT", "CONCEPTLENS_TLS_KEY", "CONCEPTLENS_TLS_CLIENT_CA", "CONCEPTLENS_AUTH_TOKEN_FILE"):
        path = env[var]
        assert any(path.startswith(m["mountPath"] + "/") for m in tls["volumeMounts"]), var
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tls[probe]["grpc"] is None  # the kubelet's gRPC probe cannot speak TLS


def test_tls_readiness_probe_reads_conceptlens_ready(tmp_path):
    from conceptlens.service.metrics import Metrics

    tls = next(e for e in CL_CONTAINERS if e["path"].parent.name == "tls")["c"]
    cmd = tls["readinessProbe"]["exec"]["command"]
    assert cmd[:2] == ["python", "-c"] and ":9090/" in cmd[2]
    metrics = Metrics()
    port = metrics.serve(0, "127.0.0.1")
    try:
        code = cmd[2].replace(":9090/", f":{port}/")
        run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode  # noqa: E731
        assert run() == 1
        metrics.ready.set(1)
        assert run() == 0
    finally:
        metrics.stop()


def test_precompute_jobs_are_indexed_resumable_and_consistent():
    jobs = {argv_of(e)[argv_of(e).index("--stage") + 1] if "--stage" in argv_of(e) else argv_of(e)[0]: e
            for e in CL_CONTAINERS if e["kind"] == "Job"}
    assert set(jobs) == {"extract", "learn", "merge"}
    ns = {}
    for stage in ("extract", "learn"):
        e = jobs[stage]
        spec = e["doc"]["spec"]
        argv = argv_of(e)
        assert argv[0] == "precompute" and spec["completionMode"] == "Indexed"
        shard = flag_value(argv, "--shard")
        assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}", shard
        assert spec["backoffLimit"] > 0  # safe: reruns skip finished files
        ns[stage] = (spec["completions"], flag_value(argv, "--work"), flag_value(argv, "--out"))
        assert ns[stage][1].startswith("/work/")
        assert env_of(e["c"]) == env_of(jobs["extract"]["c"]), "extract and learn must share one configuration"
    assert ns["extract"] == ns["learn"], "learn needs the same N, work dir and out as extract"
    merge = parse_command(argv_of(jobs["merge"]), env_of(jobs["merge"]["c"]))
    assert merge.work_dirs == [ns["extract"][1]] and merge.out == ns["extract"][2]
    assert merge.out.startswith("/bundles/")
    assert jobs["merge"]["doc"]["spec"]["backoffLimit"] > 0
    # learn and merge wait (suspended) for the stage before them
    assert not jobs["extract"]["doc"]["spec"].get("suspend")
    assert jobs["learn"]["doc"]["spec"]["suspend"] and jobs["merge"]["doc"]["spec"]["suspend"]
    # the serving Deployment mounts a bundle of the volume merge writes to
    merge_pod = jobs["merge"]["pod"]
    mount = next(m for m in jobs["merge"]["c"]["volumeMounts"] if merge.out.startswith(m["mountPath"] + "/"))
    claim = next(v for v in merge_pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    srv = server_container()
    srv_mount = next(m for m in srv["c"]["volumeMounts"] if m["mountPath"] == "/bundle")
    srv_claim = next(v for v in srv["pod"]["volumes"] if v["name"] == srv_mount["name"])
    assert srv_claim["persistentVolumeClaim"]["claimName"] == claim
    # extract and learn share the work volume
    for stage in ("extract", "learn", "merge"):
        pod = jobs[stage]["pod"]
        work = next(m for m in jobs[stage]["c"]["volumeMounts"] if m["mountPath"] == "/work")
        vol = next(v for v in pod["volumes"] if v["name"] == work["name"])
        assert vol["persistentVolumeClaim"]["claimName"] == "conceptlens-work"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for its built-in kustomize) is not installed: make audit")
def test_kustomize_renders_base_precompute_and_every_component(tmp_path):
    """`kubectl kustomize` (offline) renders each stack; with all components on, the server's merged
    command line and environment still make a valid ServerConfig."""
    def render(path: Path) -> list[dict]:
        run = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return [d for d in yaml.safe_load_all(run.stdout) if d]

    assert any(d["kind"] == "Job" for d in render(K8S / "precompute"))
    render(K8S)
    tree = shutil.copytree(K8S, tmp_path / "k8s")
    components = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
    with open(tree / "kustomization.yaml", "a") as f:
        f.write("components:\n" + "".join(f"  - components/{c}\n" for c in components))
    docs = render(tree)
    (server,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "conceptlens"]
    (c,) = server["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" in c["resources"]["limits"] and "grpc" not in c["readinessProbe"]
    env = {e["name"]: e["value"] for e in c["env"]}
    from conceptlens.service.config import ServerConfig

    cfg = ServerConfig.from_namespace(parse_command(c["args"], env)).validate()
    assert cfg.device == "cuda" and cfg.tls_cert and cfg.tls_client_ca and cfg.auth_token_file
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert any(d["kind"] == "ServiceMonitor" for d in docs)


# ---- dashboard -------------------------------------------------------------------------------------
def exposed_metric_names() -> tuple[set[str], set[str]]:
    """Sample names the service exports (with Prometheus' suffixes) and all their label names."""
    from conceptlens.service.metrics import Metrics

    m = Metrics()
    names: set[str] = set()
    for family in m.registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    labels = {"le", "namespace", "pod", "instance", "job"}
    for value in vars(m).values():
        labels |= set(getattr(value, "_labelnames", ()))
    return names, labels


def promql_strings(obj) -> list[str]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("expr", "definition") and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str) and "(" in v:
                out.append(v)
            else:
                out += promql_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            out += promql_strings(v)
    return out


def test_dashboard_metrics_exist_in_the_registry():
    dash = json.loads(DASHBOARD.read_text())
    exprs = promql_strings(dash)
    assert len(exprs) > 10
    names, labels = exposed_metric_names()
    used = set()
    for expr in exprs:
        for metric in re.findall(r"\bconceptlens_[a-z0-9_]+", expr):
            assert metric in names, f"{metric} (in {expr}) is not exported by service/metrics.py"
            used.add(metric)
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels, f"label {label!r} in {expr}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    for wanted in ("conceptlens_requests_total", "conceptlens_stage_duration_seconds_bucket",
                   "conceptlens_batch_size_bucket", "conceptlens_queue_depth", "conceptlens_cache_hits_total",
                   "conceptlens_cache_misses_total", "conceptlens_concept_presence_bucket",
                   "conceptlens_residual_bucket", "conceptlens_relative_residual_bucket"):
        assert wanted in used, f"the dashboard does not show {wanted}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_in_manifests_exist():
    """Metrics named in manifests (HPA custom metric, TLS probe, adapter rule) are real ones."""
    names, _ = exposed_metric_names()
    text = "\n".join(p.read_text() for p in yaml_files())
    used = set(re.findall(r"\bconceptlens_[a-z0-9_]+", text))
    assert {"conceptlens_queue_depth", "conceptlens_ready"} <= used
    assert used <= names, used - names


# ---- images ----------------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, dict]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages, cur, order = {}, None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            cur = m.group(2) or f"stage{len(order)}"
            stages[cur] = {"from": m.group(1), "lines": [], "deps": {m.group(1)}}
            order.append(cur)
        elif cur:
            stages[cur]["lines"].append((word, rest))
            dep = re.search(r"--from=(\S+)", rest)
            if word == "COPY" and dep:
                stages[cur]["deps"].add(dep.group(1))
    stages["_order"] = order
    return stages


def ancestry(stages, name) -> list[str]:
    seen, todo = [], [name]
    while todo:
        s = todo.pop()
        if s in stages and s not in seen and s != "_order":
            seen.append(s)
            todo += sorted(stages[s]["deps"])
    return seen


def test_serving_image_installs_no_torch_and_precompute_does():
    stages = dockerfile_stages()
    assert stages["_order"][-1] == "serve", "the default (last) stage should be the serving image"
    serve_runs = [rest for s in ancestry(stages, "serve") for w, rest in stages[s]["lines"] if w == "RUN"]
    assert any(re.search(r"pip install\b.*\s\.(\s|$)", r) for r in serve_runs), "serving stage: `pip install .`"
    for run in serve_runs:
        assert "torch" not in run.lower() and "[precompute" not in run, run
    # `pip install .` installs the project's base dependencies: those must be torch-free
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = [d.lower() for d in project["project"]["dependencies"]]
    assert not any(d.startswith(("torch", "torchvision")) for d in base), base
    assert "grpcio-tools" in " ".join(project["build-system"]["requires"])
    pre_runs = [rest for s in ancestry(stages, "precompute") for w, rest in stages[s]["lines"] if w == "RUN"]
    assert any(".[precompute]" in r for r in pre_runs)
    for target in ("serve", "serve-cuda", "precompute"):
        lines = stages[target]["lines"]
        assert ("ENTRYPOINT", '["conceptlens"]') in lines, target
        users = [rest for w, rest in lines if w == "USER"]
        assert users and not users[-1].startswith(("root", "0")), target


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    stages = dockerfile_stages()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for name in stages["_order"]:
        for word, rest in stages[name]["lines"]:
            if word != "COPY" or "--from=" in rest:
                continue
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded by Dockerfile.dockerignore"


# ---- offline validation: schemas, checkov, pip-audit (deploy/check_manifests.*, deploy/audit_deps.py) --
STACKS = ("k8s", "overlays/all-components", "k8s/precompute")  # what deploy/check_manifests.sh renders
TOOLS_PY = TOOLS_VENV / "bin" / "python"


@pytest.fixture(scope="module")
def validator() -> list[str]:
    """The command that runs deploy/check_manifests.py (in the tools venv: kubernetes-validate)."""
    if not TOOLS_PY.is_file() or subprocess.run([str(TOOLS_PY), "-c", "import kubernetes_validate"],
                                                 capture_output=True).returncode != 0:
        pytest.skip(f"kubernetes-validate is not installed in {TOOLS_VENV} (make audit installs it)")
    return [str(TOOLS_PY), str(DEPLOY / "check_manifests.py")]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for its built-in kustomize) is not installed: make audit")
def test_rendered_manifests_validate_against_the_kubernetes_schemas(tmp_path, validator):
    """Each stack, rendered by `kubectl kustomize` (the base, every component on, the precompute Jobs), is
    valid for Kubernetes 1.30 and 1.37 (strict: no unknown fields), the ServiceMonitor for its CRD."""
    files = []
    for stack in STACKS:
        run = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / stack)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"deploy/{stack}: {run.stderr}"
        files.append(tmp_path / (stack.replace("/", "-") + ".yaml"))
        files[-1].write_text(run.stdout)
    run = subprocess.run(validator + [str(f) for f in files], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, "\n".join(x for x in lines if not x.startswith("ok ")) + run.stderr
    kinds = {x.split()[2].split("/")[0] for x in lines if x.startswith("ok ")}
    assert {"Deployment", "Job", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"} <= kinds
    assert any("ServiceMonitor/conceptlens: servicemonitor.schema.json" in x for x in lines)
    n = sum(1 for x in lines if x.startswith("ok "))
    assert lines[-1] == f"kubernetes-validate: {n} documents, {n} valid, 0 invalid (Kubernetes 1.30, 1.37; strict)"


def test_manifest_validator_rejects_bad_and_unknown_documents(tmp_path, validator):
    """Wrong types, unknown fields, a kind without a schema, a bad ServiceMonitor, a missing namespace and an
    unmapped image all fail: nothing passes by being unknown."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: typo}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: conceptlens-cuda, securityContext: {runAsNonroot: true}}]
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: w, namespace: n}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: s, namespace: n}
spec:
  selector: {matchLabels: {a: b}}
  endpoints: [{port: metrics, interval: 15 seconds}]
""")
    run = subprocess.run(validator + ["-k", "1.30", str(bad)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    for wanted in ("spec.replicas: 'two' is not of type", "'runAsNonroot' was unexpected", "no schema for example.com/v1 Widget",
                   "spec.endpoints.0.interval: '15 seconds' does not match", "no metadata.namespace",
                   "image 'conceptlens-cuda' has no tag or digest"):
        assert wanted in out, (wanted, out)
    assert out.splitlines()[-1].startswith("kubernetes-validate: 3 documents, 0 valid, 3 invalid")


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv-checkov" / "bin" / "checkov").is_file(),
                    reason="checkov is not installed (deploy/check_manifests.sh --install; CI does not: ~300 MB)")
def test_checkov_finds_nothing_undocumented_in_the_manifests(tmp_path, validator):
    """checkov over every rendered stack: each failed check is fixed or skipped with its reason where it
    applies (checkov.io/skipN annotations). The Dockerfile's scan is deploy/check_manifests.sh's."""
    env = {**os.environ, "CHECKOV_FRAMEWORKS": "kubernetes", "TOOLS_VENV": str(TOOLS_VENV)}
    if KUBECTL:
        env["KUBECTL"] = KUBECTL
    run = subprocess.run(["bash", str(DEPLOY / "check_manifests.sh"), "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"checkov +kubernetes: \d+ passed, 0 failed, \d+ skipped", run.stdout), run.stdout
    report = json.loads((tmp_path / "checkov" / "kubernetes.json").read_text())
    for check in report["results"]["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment") or "") > 20, check["check_id"]  # a real reason


FAKE_PIP_AUDIT = """#!{python}
import json, os, sys
args = sys.argv[1:]
ignored = {{args[i + 1] for i, a in enumerate(args) if a == "--ignore-vuln"}}
if os.environ.get("FAKE_CRASH"):
    sys.exit("requests.exceptions.ConnectionError: Max retries exceeded (Failed to resolve 'pypi.org')")
report = json.loads(os.environ["FAKE_REPORT"])
for dep in report["dependencies"]:
    dep["vulns"] = [v for v in dep.get("vulns", []) if v["id"] not in ignored]
open(args[args.index("--output") + 1], "w").write(json.dumps(report))
sys.exit(1 if any(d.get("vulns") for d in report["dependencies"]) else 0)
"""


def test_audit_fails_on_undocumented_vulnerabilities_and_never_passes_silently(tmp_path):
    fake = tmp_path / "pip-audit"
    fake.write_text(FAKE_PIP_AUDIT.format(python=sys.executable))
    fake.chmod(0o755)
    ignores = tmp_path / "ignores.txt"
    ignores.write_text("# none\n")
    vuln = {"id": "GHSA-aaaa-bbbb-cccc", "fix_versions": ["2.0"], "aliases": ["CVE-2099-1"]}
    cases = {
        "clean": [{"name": "a", "version": "1.0", "vulns": []}, {"name": "conceptlens", "skip_reason": "distribution marked as editable"}],
        "vulnerable": [{"name": "a", "version": "1.0", "vulns": [vuln]}],
        "unanswered": [{"name": "a", "skip_reason": "Dependency not found on PyPI and could not be audited: a (1.0)"}],
        "mirror": [{"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n} (1.0)"}
                   for n in ("a", "b")],
    }
    # the fallback's PyPI project JSON, as files: a is at its latest release, b is not
    pypi = tmp_path / "pypi"
    for name, latest in (("a", "1.0"), ("b", "2.0")):
        (pypi / name).mkdir(parents=True)
        (pypi / name / "json").write_text(json.dumps({"info": {"version": latest}, "vulnerabilities": []}))
    json_url = ("--json-url", pypi.as_uri())

    def audit(case: str | None, *extra: str, crash: bool = False):
        env = {**os.environ, "FAKE_REPORT": json.dumps({"dependencies": cases.get(case, []), "fixes": []})}
        env.pop("AUDIT_STRICT", None)
        if crash:
            env["FAKE_CRASH"] = "1"
        return subprocess.run([sys.executable, str(DEPLOY / "audit_deps.py"), "--pip-audit", str(fake),
                               "--ignores", str(ignores), "--python", sys.executable, *extra],
                              env=env, capture_output=True, text=True, timeout=60)

    run = audit("clean")
    assert run.returncode == 0 and "1 packages, 1 audited, 0 known vulnerabilities" in run.stdout, run.stdout
    run = audit("vulnerable")
    assert run.returncode == 1 and "GHSA-aaaa-bbbb-cccc" in run.stdout and "FAILED" in run.stdout, run.stdout
    run = audit("unanswered", "--json-url", "")
    assert run.returncode == 0 and "NOT AUDITED: 1 of 1 packages" in run.stdout, run.stdout
    assert audit("unanswered", "--strict", "--json-url", "").returncode == 3
    run = audit("mirror", *json_url)  # a audited from its latest release's advisories, b not
    assert run.returncode == 0 and "2 packages, 1 audited" in run.stdout and "NOT AUDITED: 1 of 2" in run.stdout, \
        run.stdout
    advisory = {"id": "PYSEC-2099-1", "fixed_in": ["1.1"], "aliases": ["CVE-2099-2"], "withdrawn": None}
    (pypi / "a" / "json").write_text(json.dumps({"info": {"version": "1.0"}, "vulnerabilities": [advisory]}))
    run = audit("mirror", *json_url)
    assert run.returncode == 1 and "PYSEC-2099-1" in run.stdout and "1.1" in run.stdout, run.stdout
    advisory["withdrawn"] = "2099-02-01T00:00:00"
    (pypi / "a" / "json").write_text(json.dumps({"info": {"version": "1.0"}, "vulnerabilities": [advisory]}))
    assert audit("mirror", *json_url).returncode == 0  # a withdrawn advisory is no finding
    run = audit(None, crash=True)
    assert run.returncode == 0 and "PIP-AUDIT DID NOT RUN" in run.stdout and "unreachable" in run.stdout, run.stdout
    assert audit(None, "--strict", crash=True).returncode == 3
    ignores.write_text("GHSA-aaaa-bbbb-cccc  a 1.0: only in a code path conceptlens never calls\n")
    run = audit("vulnerable")
    assert run.returncode == 0 and "ignored GHSA-aaaa-bbbb-cccc" in run.stdout, run.stdout
    ignores.write_text("GHSA-aaaa-bbbb-cccc\n")  # an exception without its reason
    assert audit("vulnerable").returncode == 2


def test_every_workload_runs_hardened():
    """What checkov checks, guarded without it (CI does not install checkov): non-root with the runtime's
    seccomp profile, no service-account token, no privilege escalation, no capabilities, a read-only root
    filesystem, a pinned pull policy and memory limits, in every pod of deploy/k8s."""
    workloads = [(p, d) for p, d in DOCS if d["kind"] in WORKLOADS and "components" not in p.parts]
    assert len(workloads) >= 5
    for path, doc in workloads:
        pod = doc["spec"]["template"]["spec"]
        where = f"{path.relative_to(DEPLOY)} {doc['metadata']['name']}"
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] >= 10000, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert c["imagePullPolicy"] == "Always" and c["resources"]["limits"]["memory"], where
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            if "conceptlens" in c["image"]:  # Python: tempfile needs a writable /tmp
                assert "/tmp" in writable, f"{where}: a read-only root needs a writable /tmp"
        skips = [v for k, v in doc["metadata"].get("annotations", {}).items() if k.startswith("checkov.io/skip")]
        for skip in skips:  # checkov splits `ID=reason` on every '=': one only
            check, reason = skip.split("=")
            assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(reason) > 40, (where, skip)
