"""Classification tasks: prompt formats, labels and class tokens.

A prediction is the softmax over the last-position logits of the class tokens. The paper's tasks
use the reference code's exact prompts so that the published adapters work (TFB.md section 4):
note its quirks (ARC/OBQA choice lines are ``{text}) {label}`` with the record's own choice labels,
letters or digits; OBQA says ``Chioces:``; BoolQ's passage is cut at 1024 characters and its true
answer is class 1, the token ``False``). Their prompts are cut from the right at the maximum length
in tokens, as the reference's tokenizer call (``truncation=True``) does. Records use the Hugging
Face data sets' own fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PREAMBLE = "Return the label of the correct answer for the question below.\n\nQuestion: {q}\n{choices_word}:\n{choices}\nAnswer:"
BOOLQ = ("Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
         "Passage: {passage}\nQuestion: {question}\nAnswer (true or false):")
SST2 = ("Classify the sentiment of the movie review sentence below as 'positive' or 'negative'.\n\n"
        "Sentence: {sentence}\nAnswer:")
LETTERS = "ABCDEFGHIJ"

Record = Mapping[str, Any]


class TaskError(ValueError):
    """A record or label that does not fit the task; ``param``: the request field it is about
    (``inputs``, ``labels``, ...), where the raiser knows it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _field(record: Record, name: str) -> Any:
    if not isinstance(record, Mapping):
        raise TaskError(f"expected an object with field {name!r}, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise TaskError(f"missing field {name!r}")
    return record[name]


def _text(record: Record, name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"field {name!r} must be a non-empty string")
    return value


def _string_list(value: Any) -> list[str] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(t, str) for t in value):
        return None
    return list(value)


def _choices(record: Record, n_max: int) -> tuple[list[str], list[str]]:
    """(texts, labels) of a record's choices: the data set's ``{"text": [...], "label": [...]}``
    with its own labels (ARC has letters or digits), or a plain list of texts, labelled A, B, ..."""
    choices = _field(record, "choices")
    texts = _string_list(choices.get("text") if isinstance(choices, Mapping) else choices)
    if not texts:
        raise TaskError("field 'choices' must be a list of strings or {'text': [...], 'label': [...]}")
    if len(texts) > n_max:
        raise TaskError(f"field 'choices' must hold at most {n_max} strings, got {len(texts)}")
    labels = list(LETTERS[:len(texts)])
    if isinstance(choices, Mapping) and choices.get("label") is not None:
        labels = _string_list(choices["label"]) or []
        if len(labels) != len(texts):
            raise TaskError(f"choices: 'label' must be {len(texts)} strings, one per text, got {choices['label']!r}")
    return texts, labels


def _answer_key(record: Record, n_choices: int) -> int:
    """ARC/OBQA answer keys: letters A.. or the numeric keys 1..4 (mapped to 0..3)."""
    key = str(_field(record, "answerKey")).strip()
    if key.isdigit():
        index = int(key) - 1
    elif len(key) == 1 and key.upper() in LETTERS:
        index = LETTERS.index(key.upper())
    else:
        raise TaskError(f"answerKey must be a letter or a number, got {key!r}")
    if not 0 <= index < n_choices:
        raise TaskError(f"answerKey {key!r} is outside the {n_choices} choices")
    return index


def _swapped_lines(record: Record, n_max: int) -> str:
    # The reference (and the adapters trained with it) put the text before the record's own label.
    texts, labels = _choices(record, n_max)
    return "\n".join(f"{text}) {label}" for text, label in zip(texts, labels, strict=True))


def _format_winogrande(r: Record) -> str:
    choices = f"A) {_text(r, 'option1')}\nB) {_text(r, 'option2')}"
    return PREAMBLE.format(q=_text(r, "sentence"), choices_word="Choices", choices=choices)


def _target_winogrande(r: Record) -> int:
    answer = str(_field(r, "answer")).strip()
    if answer not in ("1", "2"):
        raise TaskError(f"WinoGrande answer must be '1' or '2', got {answer!r}")
    return int(answer) - 1


def _format_arc(r: Record) -> str:
    return PREAMBLE.format(q=_text(r, "question"), choices_word="Choices", choices=_swapped_lines(r, 5))


def _format_obqa(r: Record) -> str:
    return PREAMBLE.format(q=_text(r, "question_stem"), choices_word="Chioces",
                           choices=_swapped_lines(r, 4))


def _format_boolq(r: Record) -> str:
    return BOOLQ.format(passage=_text(r, "passage")[:1024], question=_text(r, "question"))


def _target_boolq(r: Record) -> int:
    answer = _field(r, "answer")
    if not isinstance(answer, bool) and answer not in (0, 1):
        raise TaskError(f"BoolQ answer must be true or false, got {answer!r}")
    return int(answer)  # true -> class 1, the token "False": the reference's fixed permutation


def _format_sst2(r: Record) -> str:
    return SST2.format(sentence=_text(r, "sentence").strip())


def _target_int(name: str, n: int) -> Callable[[Record], int]:
    def target(r: Record) -> int:
        value = _field(r, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise TaskError(f"field {name!r} must be an integer class index in [0, {n}), got {value!r}")
        return value

    return target


@dataclass(frozen=True)
class Task:
    """A classification task: how a record becomes a prompt, its labels, its true class."""

    name: str
    labels: tuple[str, ...]
    fields: tuple[str, ...]
    formatter: Callable[[Record], str] | None = None  # None: the generic task, inputs are prompts
    targeter: Callable[[Record], int] | None = None
    #: cut over-long prompts from the right at the maximum length, as the reference did for the
    #: paper's tasks (the adapters were trained and evaluated so); other tasks reject them
    truncate: bool = False

    @property
    def generative(self) -> bool:
        """The task of a generative adapter (:data:`GENERATION`): no labels, no classification."""
        return self.name == GENERATION.name

    def format(self, record: str | Record) -> str:
        """The prompt of one input: a string (generic task), or a record with the task's fields."""
        if self.formatter is None:
            if isinstance(record, Mapping):
                record = _text(record, "prompt")
            if not isinstance(record, str) or not record.strip():
                raise TaskError("an input must be a non-blank prompt string")
            return record
        if isinstance(record, str):
            if len(self.fields) == 1:  # e.g. sst2: a bare string is its one field, the sentence
                return self.formatter({self.fields[0]: record})
            raise TaskError(f"task {self.name!r} takes objects with fields {list(self.fields)}, got a string")
        return self.formatter(record)

    def placeholder(self, text: str) -> str | Record:
        """A valid input of this task with ``text`` in every field (a warm-up, or finding the
        instruction's tokens: what the prompts of two placeholders share)."""
        if self.formatter is None:
            return text
        record: dict[str, Any] = {name: text for name in self.fields}
        if "choices" in self.fields:
            record["choices"] = [text, text]
        return record

    def target(self, record: str | Record) -> int | None:
        """The true class index of a labelled record, or None if it has no label."""
        if self.targeter is None:
            if not isinstance(record, Mapping) or record.get("label") is None:
                return None
            return self.label_index(record["label"])
        return self.targeter(record)  # type: ignore[arg-type]

    def label_index(self, label: str | int) -> int:
        """A label given as a string of ``labels`` or as an index."""
        if isinstance(label, bool):
            raise TaskError(f"label must be one of {list(self.labels)} or an index, got {label!r}")
        if isinstance(label, int):
            if not 0 <= label < len(self.labels):
                raise TaskError(f"label index {label} is outside [0, {len(self.labels)})")
            return label
        if label not in self.labels:
            raise TaskError(f"unknown label {label!r}; labels are {list(self.labels)}")
        return self.labels.index(label)


def generic_task(labels: Sequence[str]) -> Task:
    labels = tuple(labels)
    if len(labels) < 2:
        raise TaskError(f"need at least 2 labels, got {list(labels)}")
    if len(set(labels)) != len(labels):
        raise TaskError(f"labels must be distinct, got {list(labels)}")
    for label in labels:
        if not isinstance(label, str) or not label:
            raise TaskError(f"labels must be non-empty strings, got {label!r}")
    return Task("generic", labels, ("prompt",))


_ARC = dict(labels=tuple("ABCDE"), fields=("question", "choices"), formatter=_format_arc, truncate=True)
TASKS: dict[str, Task] = {
    "winogrande": Task("winogrande", ("A", "B"), ("sentence", "option1", "option2"),
                       _format_winogrande, _target_winogrande, truncate=True),
    "arc_challenge": Task("arc_challenge", targeter=lambda r: _answer_key(r, 5), **_ARC),
    "arc_easy": Task("arc_easy", targeter=lambda r: _answer_key(r, 5), **_ARC),
    "openbookqa": Task("openbookqa", tuple("ABCD"), ("question_stem", "choices"), _format_obqa,
                       lambda r: _answer_key(r, 4), truncate=True),
    "boolq": Task("boolq", ("True", "False"), ("passage", "question"), _format_boolq, _target_boolq, truncate=True),
    "sst2": Task("sst2", ("negative", "positive"), ("sentence",), _format_sst2, _target_int("label", 2)),
}
#: the task of a generative adapter: no labels; it answers /v1/completions and /v1/chat/completions,
#: its sigma is searched on its own greedy answers (:mod:`tfb_core.search.generation`)
GENERATION = Task("generation", (), ("prompt",))
# WG-S and WG-M of the paper are WinoGrande sizes, not formats.
ALIASES = {"wg_s": "winogrande", "wg_m": "winogrande", "arc-c": "arc_challenge", "arc-e": "arc_easy",
           "obqa": "openbookqa", "generate": "generation"}


def get_task(name: str | None = None, labels: Sequence[str] | None = None) -> Task:
    """A named task, or the generic task with ``labels``. Raises ``TaskError`` naming the problem."""
    if name is None or name == "generic":
        if labels is None:
            raise TaskError("give a task name or labels")
        return generic_task(labels)
    key = ALIASES.get(name.lower(), name.lower())
    if key == GENERATION.name:
        if labels is not None:
            raise TaskError(f"task 'generation' has no labels, got {list(labels)}")
        return GENERATION
    if key not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}, 'generation' (a generative "
                        "adapter), or 'generic' with labels")
    task = TASKS[key]
    if labels is not None and tuple(labels) != task.labels:
        raise TaskError(f"task {key!r} has fixed labels {list(task.labels)}, got {list(labels)}")
    return task


def class_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    """The class token of each label: its single token in ``tokenizer(label, add_special_tokens=False)``.

    A label that is not exactly one token, or that shares its token with another label, is an error
    that names it: the class would not be one distinct next-token logit.
    """
    ids: list[int] = []
    for label in labels:
        toks = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise TaskError(f"label {label!r} is {len(toks)} tokens for this tokenizer, not one: "
                            "pick labels that are single tokens (e.g. 'A', 'B', 'yes', 'no')")
        if toks[0] in ids:
            other = labels[ids.index(toks[0])]
            raise TaskError(f"labels {other!r} and {label!r} map to the same token {toks[0]}")
        ids.append(toks[0])
    return ids
