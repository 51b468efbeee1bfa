"""The ``tfb`` console script: tfb_core's subcommands (predict, search, eval) plus ``serve``.

``tfb serve`` takes the model flags of ``tfb predict`` and ``--host``/``--port``; a flag given on
the command line overrides the TFB_* environment, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
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
    "adapter_name": "adapter_name",
}


def lora_module(text: str) -> dict[str, Any]:
    """One ``--lora-modules`` entry, as vLLM takes them: ``name=path`` (a folder or hub id),
    ``name=published:method/dataset/seed``, or a JSON object with the fields of TFB_ADAPTERS."""
    text = text.strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
        if not isinstance(entry, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return entry
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected name=path, name=published:method/dataset/seed or a JSON object, "
                                         f"got {text!r}")
    if source.startswith("published:"):
        return {"name": name, "published": source[len("published:"):]}
    return {"name": name, "adapter": source}


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields of the flags that were given (the shared flags default to None)."""
    out = {field: getattr(args, flag) for flag, field in FLAG_SETTINGS.items() if getattr(args, flag, None) is not None}
    if "labels" in out:
        out["labels"] = tuple(out["labels"])
    if getattr(args, "lora_modules", None):
        out["adapters"] = json.dumps(args.lora_modules)
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


def cmd_search(args: argparse.Namespace) -> int:
    """``tfb search``: one adapter's sigma (tfb_core's), or with ``--registry`` every adapter of a
    registry (:func:`search_registry`)."""
    if getattr(args, "registry", None) is None:
        return core_cli.cmd_search(args)
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        settings = Settings(**settings_overrides(args))
    except ValidationError as exc:
        raise ValueError(settings_error(exc)) from None
    for line in search_registry(settings, args.registry):
        print(json.dumps(line) if args.json else
              f"{line['name']}: sigma = {line['sigma']:.6g} ({line['sigma_source']}) in {line['seconds']:.1f}s",
              flush=True)
    return 0


def search_registry(settings: Any, registry: str) -> Any:
    """Fill the sigma and calibration caches (TFB_CACHE_DIR) for every adapter of ``registry`` before
    traffic, as a replica would load each (the same keys): the base model once, then per adapter its
    files read, its sigma fixed, cached or searched now, its calibration cached, and it is unloaded.
    Yields ``{"name", "sigma", "sigma_source", "seconds"}`` per adapter."""
    import time
    from dataclasses import replace

    from app.registry import Registry
    from tfb_core.serving import runtime
    from tfb_core.serving.lifecycle import RuntimeAdapter
    from tfb_core.serving.startup import finish_engine, load_engine

    reg = Registry(registry, settings, {n for n, _ in settings.engine_configs()})  # RegistryError: exit 2
    # the base model, its own adapter with sigma 0: the registry's adapters' keys do not depend on it
    base = load_engine(replace(settings.engine_config().with_defaults(), sigma=0.0, calibration=None), progress=False)
    for name in reg.names():
        started = time.monotonic()
        prepared = runtime.prepare(base, RuntimeAdapter(name, settings.adapter_config(reg.entries[name])))
        clf, engine = runtime.install(base.classifier, prepared, background_calibration=False)
        try:
            if engine is None:
                engine = finish_engine(prepared.plan, clf)
            yield {"name": name, "sigma": engine.sigma, "sigma_source": engine.sigma_source,
                   "seconds": round(time.monotonic() - started, 3)}
        finally:
            runtime.unload(clf, engine)


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
    m = s.add_argument_group("many adapters on one base model (TFB_ADAPTERS)")
    m.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=None, metavar="SPEC",
                   help="named adapters, the first the default: name=path, name=published:method/dataset/seed, "
                        "or a JSON object (name, adapter|path|published, task, labels, sigma, anchor, calibration...)")
    m.add_argument("--adapter-name", default=None, help="the single adapter's name (TFB_ADAPTER_NAME)")
    s.set_defaults(func=cmd_serve)
    search = sub.choices["search"]
    search.add_argument("--registry", default=None, metavar="FILE|FOLDER",
                        help="search every adapter of this registry (a Ray deployment's, deploy/ray/multiplex_app.py) "
                             "and cache sigma and the calibration in --cache-dir before traffic")
    search.set_defaults(func=cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
