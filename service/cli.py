"""The one entry point, ``conceptlens``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Every flag is also read from ``CONCEPTLENS_<FLAG>`` (upper case, dashes as
underscores); a flag on the command line wins over the environment.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help). Modules are imported only when their command runs, so the
# serving commands never import torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "precompute": ("conceptlens.precompute.job_cli", "learn concept bases and write a bundle"),
    "merge": ("conceptlens.precompute.merge_cli", "assemble one bundle from precompute shards"),
    "serve": ("conceptlens.service.serve_cli", "run the gRPC explanation service"),
    "explain": ("conceptlens.service.explain_cli", "explain an image through a running service"),
    "report": ("conceptlens.precompute.report_cli", "write the HTML evaluation report of a bundle"),
    "torchserve-archive": ("conceptlens.handlers.archive_cli", "build a TorchServe model archive"),
}


class CLIError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Set each option's default from CONCEPTLENS_<FLAG> when that variable is set."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        long = max(action.option_strings, key=len).lstrip("-")
        var = "CONCEPTLENS_" + long.upper().replace("-", "_")
        if var not in environ:
            continue
        raw = environ[var]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
            action.default = value if isinstance(action, argparse._StoreTrueAction) else not value
        elif action.nargs in ("+", "*"):
            action.default = [action.type(v) if action.type else v for v in raw.split(",") if v]
        else:
            action.default = action.type(raw) if action.type else raw
        action.required = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptlens", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("CONCEPTLENS_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the command first (not with parse_known_args: "--help" would exit before the command's
    # module has added its arguments), then let that module add them.
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None:
        parser.parse_args(argv)  # prints usage or help
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    subparser = parser._subparsers._group_actions[0].choices[command]
    module.add_arguments(subparser)
    apply_env_defaults(subparser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except CLIError as e:
        print(f"conceptlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # `python -m conceptlens.service.cli`: run the package's main so errors match
    from conceptlens.service.cli import main as package_main

    sys.exit(package_main())
