"""The ``tfb`` console script: tfb_core's subcommands (predict, search, eval) plus ``serve``.

``tfb serve`` takes the model flags of ``tfb predict`` and ``--host``/``--port``; a flag given on
the command line overrides the TFB_* environment, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from tfb_core import cli as core_cli

#: flag dest (tfb_core.cli.add_model_arguments) -> Settings field
FLAG_SETTINGS = {
    "published": "published", "model": "model", "model_revision": "model_revision",
    "model_subfolder": "model_subfolder",
    "gguf_file": "gguf_file", "adapter": "adapter", "adapter_revision": "adapter_revision",
    "adapter_subfolder": "adapter_subfolder", "dtype": "dtype", "device": "device", "load_in_8bit": "load_in_8bit",
    "cache_dir": "cache_dir", "max_length": "max_length", "task": "task", "labels": "labels", "sigma": "sigma",
    "samples": "n_samples", "seed": "seed", "anchor": "anchor", "criterion": "search_criterion",
    "tolerance": "search_tolerance", "low": "search_low", "high": "search_high", "iters": "search_iters", "rtol": "search_rtol",
    "search_samples": "search_samples", "search_method": "search_method", "host": "host", "port": "port",
}


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields of the flags that were given (the shared flags default to None)."""
    out = {field: getattr(args, flag) for flag, field in FLAG_SETTINGS.items() if getattr(args, flag, None) is not None}
    if "labels" in out:
        out["labels"] = tuple(out["labels"])
    if getattr(args, "verbose", False):
        out["log_level"] = "debug"
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from app.server import run_server
    from app.settings import Settings

    try:
        settings = Settings(**settings_overrides(args))
    except ValidationError as exc:  # one line naming each bad setting -> exit 2
        raise ValueError(settings_error(exc)) from None
    run_server(settings)  # uvicorn with the HTTP limits of the settings
    return 0


def settings_error(exc: Any) -> str:
    """One line from a pydantic ``ValidationError`` of :class:`Settings`: each bad field and why."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc} (TFB_{loc.upper()}): {err['msg']}" if loc else str(err["msg"]))
    return "invalid settings: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = core_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser("serve", help="serve predictions over HTTP (settings also from TFB_* variables)")
    core_cli.add_model_arguments(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default=None, help="address to bind (TFB_HOST, default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="port (TFB_PORT, default 8000)")
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
