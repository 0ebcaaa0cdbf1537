"""Validate rendered Kubernetes manifests offline (run by deploy/check_manifests.sh and tests/test_deploy.py).

    python deploy/check_manifests.py [-k 1.30 -k 1.37] RENDERED.yaml ...

Runs in the tools venv (.venv-tools: kubernetes-validate), not the project's. Every document of every
file is checked, strictly (unknown fields are errors), against

  * the Kubernetes OpenAPI schemas that kubernetes-validate ships, for each version asked for;
  * for the one custom resource used, ServiceMonitor (monitoring.coreos.com/v1, not in the core
    schemas), deploy/k8s/components/servicemonitor/servicemonitor.schema.json: the prometheus-operator
    CRD's declaration of the fields this repository sets, with ObjectMeta and LabelSelector from the
    Kubernetes schemas;
  * two render checks the schemas cannot make: every object but the Namespace has a namespace, and
    every container image has a tag or digest (not latest). An overlay that turns components on must
    set the namespace and map the components' images again: the base's transformers ran before.

A kind with no schema is an error, never a silent pass. Prints one line per document and a summary
line `kubernetes-validate: N documents, N valid, N invalid (Kubernetes 1.30, 1.37; strict)`. Exit
status: 0 all valid, 1 some invalid, 2 usage or tool error.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from kubernetes_validate.version import __version__ as kv_version
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "k8s/components/servicemonitor/servicemonitor.schema.json",
}
DEFAULT_VERSIONS = ("1.30", "1.37")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}


def schema_dir(version: str) -> str:
    """kubernetes-validate's strict schema directory for a version (its newest not newer than it)."""
    if kv.major_minor(version) > kv.major_minor(kv.latest_version()):
        raise kv.VersionNotSupportedError(version)
    actual = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)]
    if not actual:
        raise kv.VersionNotSupportedError(version)
    return f"kubernetes-json-schema/v{actual[-1]}-local-strict"


def schema_errors(doc: dict, version: str) -> list[jsonschema.ValidationError]:
    """All schema errors (kubernetes_validate.validate stops at the first) of one document."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    root = schema_dir(version)
    defs = kv.schema_contents(f"{root}/_definitions.json", version)
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
    else:  # as kubernetes_validate.validate finds it: rbac.authorization.k8s.io/v1 Role -> role-rbac-v1.json
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(doc.get("apiVersion")))
        try:
            schema = kv.schema_contents(f"{root}/{str(doc.get('kind')).lower()}-{group_version}.json", version)
        except FileNotFoundError:
            raise kv.SchemaNotFoundError(version=kv.major_minor(version), kind=doc.get("kind"),
                                         api_version=doc.get("apiVersion"))
    registry = Resource.from_contents(schema) @ (Resource.from_contents(defs) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    pod = (spec.get("jobTemplate", {}).get("spec", spec).get("template") or {}).get("spec") or {}
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def render_checks(doc: dict) -> list[str]:
    errors = []
    meta = doc.get("metadata") or {}
    if doc.get("kind") not in CLUSTER_SCOPED and not meta.get("namespace"):
        errors.append("no metadata.namespace (an overlay or component added it after the base set the namespace?)")
    for c in containers(doc):
        image = c.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and tag in ("", "latest"):
            errors.append(f"container {c.get('name')}: image {image!r} has no tag or digest "
                          "(a name no images: entry mapped?)")
    return errors


def check_doc(doc: dict, versions: list[str]) -> tuple[str, list[str]]:
    """(what it was checked against, errors) for one document."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    errors = []
    for version in versions:
        try:
            for e in schema_errors(doc, version):
                path = ".".join(str(p) for p in e.absolute_path) or "(document)"
                errors.append(f"[{version}] {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"[{version}] no schema for {doc.get('apiVersion')} {doc.get('kind')}: {e.message}; "
                          "add one (see CRD_SCHEMAS) instead of skipping it")
    errors += render_checks(doc)
    if key in CRD_SCHEMAS:
        against = f"{CRD_SCHEMAS[key].name} (CRD fields; ObjectMeta, LabelSelector of Kubernetes {', '.join(versions)})"
    else:
        against = f"Kubernetes {', '.join(versions)} OpenAPI schema (strict)"
    return against, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions",
                        help=f"Kubernetes version(s) to validate against (default {', '.join(DEFAULT_VERSIONS)})")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    versions = args.versions or list(DEFAULT_VERSIONS)
    for v in versions:
        try:
            schema_dir(v)
        except kv.VersionNotSupportedError:
            print(f"FATAL kubernetes-validate {kv_version} has no schemas for Kubernetes {v} (it has {kv.all_versions()[0]} to {kv.latest_version()})")
            return 2
    total = bad = 0
    for path in args.files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except (OSError, yaml.YAMLError) as e:
            print(f"FATAL {path}: {e}")
            return 2
        if not docs:
            print(f"FATAL {path}: no documents (did the render fail?)")
            return 2
        for doc in docs:
            total += 1
            name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            against, errors = check_doc(doc, versions)
            if errors:
                bad += 1
                for err in errors:
                    print(f"INVALID {path.name} {name}: {err}")
            else:
                print(f"ok      {path.name} {name}: {against}")
    print(f"kubernetes-validate: {total} documents, {total - bad} valid, {bad} invalid "
          f"(Kubernetes {', '.join(versions)}; strict)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
