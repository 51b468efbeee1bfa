"""Prompt fidelity: for every paper task, our prompt, true class, class tokens and token ids equal
what the reference code produces, for each record shape of the hub data sets, under Llama 3.1's
real tokenizer.

The oracle below restates the reference's data code (dataset/utils/dsets.py of
Wang-ML-Lab/bayesian-peft: zero-shot preambles, ``f"{l}) {c}" for l, c in zip(text, label)``,
``passage[:1024]``, class targets ``ord(answerKey) - ord("A")`` or ``int(answerKey) - 1``, label
ids ``tokenizer(labels, add_special_tokens=False).input_ids[:, -1:]``, and the tokenizer call
``padding=True, truncation=True, max_length=300`` with left padding and pad = bos) independently
of tfb_core.data.tasks. Records are written as the hub stores them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tfb_core.data.tasks import class_token_ids, get_task
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.layout import pad_left

MAX_SEQ_LEN = 300  # the reference scripts' --max-seq-len
_MC = "Return the label of the correct answer for the question below.\n\nQuestion: {question}\n{word}:\n{choices}\nAnswer:"
_BOOLQ = ("Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
          "Passage: {passage}\nQuestion: {question}\nAnswer (true or false):")


def ref_prompt(dataset: str, e: dict) -> str:
    if dataset.startswith("winogrande"):
        return _MC.format(question=e["sentence"], word="Choices", choices=f"A) {e['option1']}\nB) {e['option2']}")
    if dataset == "boolq":
        return _BOOLQ.format(passage=e["passage"][:1024], question=e["question"])
    lines = "\n".join(f"{a}) {b}" for a, b in zip(e["choices"]["text"], e["choices"]["label"], strict=False))
    if dataset == "obqa":
        return _MC.format(question=e["question_stem"], word="Chioces", choices=lines)
    return _MC.format(question=e["question"], word="Choices", choices=lines)


def ref_class(dataset: str, e: dict) -> int:
    if dataset.startswith("winogrande"):
        return int(e["answer"]) - 1
    if dataset == "boolq":
        return int(e["answer"])
    alpha = ord(e["answerKey"]) - ord("A")
    return alpha if alpha >= 0 else int(e["answerKey"]) - 1


def ref_label_ids(tokenizer, dataset: str) -> list[int]:
    n = {"boolq": 2, "obqa": 4}.get(dataset, 2 if dataset.startswith("winogrande") else 5)
    labels = ["True", "False"] if dataset == "boolq" else [chr(ord("A") + i) for i in range(n)]
    return [row[-1] for row in tokenizer(labels, add_special_tokens=False)["input_ids"]]


LONG = " ".join(["The mitochondria is the powerhouse of the cell, and so on."] * 40)  # > 300 tokens
RECORDS = {
    "ARC-Challenge": [
        {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite "
         "impact. Which is the most likely effect of this increase in rotation?",
         "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                              "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"id": "NYSEDREGENTS_2015_4_8", "question": "Which object is the best conductor of electricity?",
         "choices": {"text": ["a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"],
                     "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
        {"id": "three", "question": "Which state of matter has a definite shape?",
         "choices": {"text": ["solid", "liquid", "gas"], "label": ["A", "B", "C"]}, "answerKey": "A"},
        {"id": "five", "question": "Which is a mammal?",
         "choices": {"text": ["shark", "frog", "whale", "eagle", "snake"], "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "C"},
        {"id": "long", "question": LONG + " Which organelle is it?",
         "choices": {"text": ["nucleus", "mitochondrion", "ribosome", "vacuole"], "label": ["1", "2", "3", "4"]},
         "answerKey": "2"},
    ],
    "ARC-Easy": [
        {"id": "MCAS_2000_4_6", "question": "Which tool should a student use to measure the mass of a rock?",
         "choices": {"text": ["balance", "ruler", "thermometer"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    ],
    "obqa": [
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                              "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    ],
    "winogrande_s": [
        {"sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating "
         "intestine.", "option1": "Ian", "option2": "Dennis", "answer": "2"},
        {"sentence": "He never comes to my home, but I always go to his house because the _ is smaller.",
         "option1": "home", "option2": "house", "answer": "1"},
    ],
    "boolq": [
        {"question": "do iran and afghanistan speak the same language", "answer": True,
         "passage": "Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi, is one of the Western Iranian "
                    "languages within the Indo-Iranian branch of the Indo-European language family. " * 12},
        {"question": "is the sun a star", "answer": False, "passage": "Short passage."},
    ],
}
TASK_OF = {"ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy", "obqa": "openbookqa",
           "winogrande_s": "winogrande", "boolq": "boolq"}
CASES = [(d, i) for d, recs in RECORDS.items() for i in range(len(recs))]


@pytest.mark.parametrize("dataset, i", CASES)
def test_prompt_and_class_equal_the_reference(dataset, i):
    e = RECORDS[dataset][i]
    task = get_task(TASK_OF[dataset])
    assert task.format(e) == ref_prompt(dataset, e)
    assert task.target(e) == ref_class(dataset, e)


def test_digit_labelled_choices_keep_their_own_labels():
    prompt = get_task("arc_challenge").format(RECORDS["ARC-Challenge"][1])
    assert "a wax crayon) 1\na plastic spoon) 2" in prompt and ") A" not in prompt


def test_record_shapes_cover_the_hub_data():
    shapes = {(len(e["choices"]["text"]), e["choices"]["label"][0]) for recs in RECORDS.values() for e in recs
              if "choices" in e}
    assert {3, 4, 5} <= {n for n, _ in shapes} and {"A", "1"} <= {first for _, first in shapes}
    assert any(len(e["passage"]) > 1024 for e in RECORDS["boolq"])


@pytest.mark.parametrize("dataset", sorted(TASK_OF))
def test_labels_are_single_distinct_tokens_equal_to_the_reference(llama3_tokenizer, dataset):
    task = get_task(TASK_OF[dataset])
    ids = class_token_ids(llama3_tokenizer, task.labels)  # raises unless single and distinct
    assert ids == ref_label_ids(llama3_tokenizer, dataset)


def test_token_ids_equal_the_reference_tokenizer_call_with_truncation(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.pad_token_id is None  # Llama 3.1 has no pad token: the reference (and we) pad with bos
    pairs = [(d, e) for d, recs in RECORDS.items() for e in recs]
    prompts = [ref_prompt(d, e) for d, e in pairs]
    tok.padding_side, tok.pad_token = "left", tok.bos_token
    try:
        ref = tok(prompts, padding=True, truncation=True, max_length=MAX_SEQ_LEN)
    finally:
        tok.pad_token = None
    assert max(len(t) for t in tok(prompts)["input_ids"]) > MAX_SEQ_LEN  # some prompts are cut
    assert all(get_task(t).truncate for t in TASK_OF.values())
    ours = BayesianClassifier.tokenize(SimpleNamespace(tokenizer=tok, truncate=True, max_length=MAX_SEQ_LEN),
                                       [get_task(TASK_OF[d]).format(e) for d, e in pairs])
    ids, mask, _ = pad_left(ours, tok.bos_token_id)
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]
    # a cut prompt keeps its start (bos and instruction) and loses its end, answer cue included
    long_ids = ours[[e.get("id") for _, e in pairs].index("long")]
    assert len(long_ids) == MAX_SEQ_LEN and long_ids[0] == tok.bos_token_id
    assert not tok.decode(long_ids).endswith("Answer:")
