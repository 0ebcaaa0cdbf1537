"""``conceptlens merge WORK_DIRS... --out BUNDLE``: one bundle from sharded precompute runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..service.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("work_dirs", nargs="+", help="precompute work directories (OUT.work of each shard, or a shared one)")
    p.add_argument("--out", required=True, help="bundle directory to write")


def run(args: argparse.Namespace) -> int:
    from .job import JobError, merge_bundle

    try:
        out = merge_bundle([Path(w) for w in args.work_dirs], Path(args.out))
    except JobError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        from .job_cli import write_error

        raise CLIError(write_error(e, args.out)) from None
    print(f"bundle written: {out}")
    return 0
