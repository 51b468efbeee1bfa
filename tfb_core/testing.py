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
