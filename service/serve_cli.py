"""``conceptlens serve --bundle DIR | --repository DIR``: run the explanation service until SIGTERM
(SIGHUP rescans the repository).

Every flag is a field of :class:`ServerConfig` (``--max-batch-size`` is ``max_batch_size``) and is
also read from ``CONCEPTLENS_<FLAG>``. Exit status 0 after a graceful drain, 2 for a bad setting
or bundle.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import typing

from .cli import CLIError
from .config import ServerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_)
            continue
        base = next((t for t in (int, float, str) if t is kind or t in typing.get_args(kind)), str)
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        default_txt = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, dest=f.name, type=base, default=f.default, help=help_ + default_txt,
                            metavar=f.name.upper() if not extra else None, **extra)


def run(args: argparse.Namespace) -> int:
    from .bundle import BundleError
    from .memory import limit_malloc_arenas
    from .runtime import RuntimeSetupError
    from .server import serve

    try:
        config = ServerConfig.from_namespace(args).validate()
        limit_malloc_arenas(config.malloc_arenas)  # before the server's threads start
        return asyncio.run(serve(config))
    except (ValueError, BundleError, RuntimeSetupError, OSError) as e:
        raise CLIError(str(e)) from None
