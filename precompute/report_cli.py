"""``conceptlens report BUNDLE [--out DIR]``: the static HTML evaluation report of a bundle.

torch-free: runs wherever the service runs.
"""
from __future__ import annotations

import argparse

from ..service.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (as written by `conceptlens precompute` or `merge`)")
    p.add_argument("--out", default=None,
                   help="report directory to write (default: BUNDLE-report next to the bundle, e.g. "
                        "demo-out/bundle -> demo-out/bundle-report); an earlier report there is replaced")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking every bundle file against its sha256 in manifest.json")


def run(args: argparse.Namespace) -> int:
    from ..service.bundle import BundleError
    from .report import ReportError, write_report

    try:
        out = write_report(args.bundle, args.out, verify=not args.no_verify)
    except (BundleError, ReportError) as e:
        raise CLIError(str(e)) from None
    print(f"report written: {out / 'index.html'}")
    return 0
