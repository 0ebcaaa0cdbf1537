"""`make audit`: known vulnerabilities of the packages installed in the project's venv (pip-audit).

    .venv-tools/bin/python deploy/audit_deps.py [--python .venv/bin/python] [--strict]

Runs pip-audit from the tools venv against another environment (PIPAPI_PYTHON_LOCATION), skipping
the editable project itself (not on PyPI), with the exceptions of deploy/pip-audit-ignores.txt (each
needs a reason). Outcomes:

  exit 1  a known vulnerability that is not documented as an exception (with or without a fix):
          upgrade the package, or add the ID with its reason to deploy/pip-audit-ignores.txt;
  exit 0  every package audited and nothing found;
  exit 0, with a NOT AUDITED banner, when the vulnerability service did not answer for some
          packages, even after the fallback below (an outage or, on a machine behind a PyPI mirror, a mirror that does not serve
          PyPI's per-version JSON API). pip-audit alone reports that as "No known vulnerabilities
          found"; here it is never a silent pass, but an advisory database being unreachable does
          not fail the build. --strict (or AUDIT_STRICT=1) makes it exit 3 instead.
  exit 2  pip-audit could not run at all, or an exception has no reason.

Fallback for the packages pip-audit could not audit: PyPI's project JSON (``/pypi/NAME/json``, which
mirrors serve where they lack the per-version one) lists the advisories of the *latest* release; a
package installed at its latest release is audited from it, any other stays NOT AUDITED.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORES = ROOT / "deploy" / "pip-audit-ignores.txt"


def read_ignores(path: Path) -> dict[str, str]:
    """ID -> reason, from lines `ID  reason` ('#' starts a comment line)."""
    out = {}
    for n, line in (enumerate(path.read_text().splitlines(), 1) if path.exists() else ()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vid, _, reason = line.partition(" ")
        if not re.match(r"^[A-Z][A-Z0-9]*-[\w-]+$", vid) or len(reason.strip()) < 10:
            print(f"{path}:{n}: want `ID  reason` (a real reason), got {line!r}", file=sys.stderr)
            raise SystemExit(2)
        out[vid] = reason.strip()
    return out


def latest_release_advisories(name: str, version: str, base_url: str) -> tuple[list[dict] | None, str]:
    """(advisories of ``name`` ``version`` in pip-audit's shape, "") when ``version`` is the latest
    release in ``base_url``/NAME/json, else (None, why not). Withdrawn advisories are left out."""
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/{name}/json", timeout=20) as r:
            data = json.load(r)
    except Exception as e:
        return None, f"project JSON unavailable ({type(e).__name__})"
    latest = (data.get("info") or {}).get("version")
    if latest != version:
        return None, f"not its latest release ({latest}), whose advisories alone are served"
    return [{"id": v.get("id", "?"), "fix_versions": v.get("fixed_in") or [], "aliases": v.get("aliases") or []}
            for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")], ""


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    print("!" * width)
    for x in lines:
        print(f"! {x.ljust(width - 4)} !")
    print("!" * width)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="the interpreter of the environment to audit (default: the project's .venv)")
    parser.add_argument("--service", default=os.environ.get("PIP_AUDIT_SERVICE", "pypi"), choices=["pypi", "osv"],
                        help="vulnerability service (default pypi: PyPI's JSON API; osv: api.osv.dev)")
    parser.add_argument("--ignores", type=Path, default=IGNORES)
    parser.add_argument("--pip-audit", default=str(Path(sys.executable).parent / "pip-audit"),
                        help="the pip-audit to run (default: the one beside this interpreter)")
    parser.add_argument("--json-url", default=os.environ.get("AUDIT_JSON_URL", "https://pypi.org/pypi"),
                        help="PyPI's JSON API for the latest-release fallback ('' turns it off)")
    parser.add_argument("--strict", action="store_true", default=os.environ.get("AUDIT_STRICT") == "1",
                        help="packages that could not be audited fail the run (exit 3)")
    args = parser.parse_args()
    ignores = read_ignores(args.ignores)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [args.pip_audit, "--vulnerability-service", args.service, "--skip-editable", "--progress-spinner", "off",
               "--format", "json", "--output", str(report_path)]
        for vid in ignores:
            cmd += ["--ignore-vuln", vid]
        env = {**os.environ, "PIPAPI_PYTHON_LOCATION": args.python}
        print(f"$ PIPAPI_PYTHON_LOCATION={args.python} {' '.join(cmd)}", flush=True)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            report = None
    if report is None:  # pip-audit stopped before writing its report: no network, or it failed
        tail = [x[:160] for x in (run.stderr or run.stdout).strip().splitlines()[-2:]]
        network = any(w in "\n".join(tail) for w in ("Connection", "Timeout", "resolve", "Max retries", "SSL"))
        banner([f"PIP-AUDIT DID NOT RUN (exit {run.returncode}): "
                + ("the vulnerability service is unreachable" if network else "see its output below"),
                "NOTHING WAS AUDITED"] + tail)
        if network and not args.strict:
            return 0
        return 3 if network else 2
    deps = report.get("dependencies", [])
    editable = [d for d in deps if "editable" in d.get("skip_reason", "")]  # the project itself
    skipped = [d for d in deps if "skip_reason" in d and d not in editable]
    audited = [d for d in deps if "skip_reason" not in d]
    if skipped and args.json_url:
        def fallback(d):
            m = re.search(r": (\S+) \(([^)]+)\)$", d["skip_reason"])
            if not m:
                return d, None, ""
            return (d, *latest_release_advisories(m.group(1), m.group(2), args.json_url))
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(fallback, skipped))
        now = [{"name": d["name"], "version": re.search(r"\(([^)]+)\)$", d["skip_reason"]).group(1),
                "vulns": [v for v in vulns if v["id"] not in ignores and not set(v["aliases"]) & set(ignores)]}
               for d, vulns, _ in results if vulns is not None]
        skipped = [{**d, "skip_reason": why or d["skip_reason"]} for d, vulns, why in results if vulns is None]
        print(f"fallback ({args.json_url}/NAME/json, latest releases only): {len(now)} more audited, "
              f"{len(skipped)} still not audited")
        audited += now
    found = [(d, v) for d in audited for v in d.get("vulns", [])]
    print(f"{'package':28} {'version':14} {'vulnerability':22} fixed in")
    for d, v in found:
        print(f"{d['name']:28} {d['version']:14} {v['id']:22} {', '.join(v.get('fix_versions') or []) or '(no fix yet)'}"
              f"   aliases: {', '.join(v.get('aliases') or []) or '-'}")
    for vid, reason in ignores.items():
        print(f"ignored {vid}: {reason}")
    print(f"pip-audit ({args.service}): {len(deps) - len(editable)} packages, {len(audited)} audited, {len(found)} known "
          f"vulnerabilities ({sum(1 for _, v in found if v.get('fix_versions'))} with a fix), "
          f"{len(ignores)} documented exceptions, {len(skipped)} not audited")
    if skipped:
        reasons = sorted({re.sub(r"\s*\([^)]*\)", "", re.sub(r":.*", "", d["skip_reason"])) for d in skipped})
        print("not audited: " + ", ".join(f"{d['name']} ({d['skip_reason'].split('(')[-1].rstrip(')')})"
                                          if "latest" not in d["skip_reason"] else d["name"] for d in skipped))
        banner([f"NOT AUDITED: {len(skipped)} of {len(deps) - len(editable)} packages ({', '.join(reasons)})",
                f"e.g. {skipped[0]['name']}: {skipped[0]['skip_reason']}",
                "The vulnerability service did not answer for them (outage, or a PyPI mirror without",
                "the per-version JSON API) and they are not at their latest release: no vulnerability",
                "check was made for these packages.",
                "Not a failure unless --strict / AUDIT_STRICT=1 (see deploy/audit_deps.py)."])
    if found:
        print(f"FAILED: {len(found)} known vulnerabilities: upgrade, or document each in {args.ignores.name}")
        return 1
    if skipped and args.strict:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
