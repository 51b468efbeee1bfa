"""Short answers compared as answers: one normalisation for exact match and for the clusters of N answers.

    normalize_answer("“The Paris”")  == normalize_answer("paris")      # "paris"
    normalize_answer("1,000.0")      == normalize_answer("1000")       # "1000"
    normalize_answer("3–5")          == "3 5"                          # a range, not 35 nor 3 and -5
    exact_match("−42", ["-42"])                                        # True

SQuAD's exact-match normalisation (lower case, punctuation and the articles a / an / the removed,
whitespace collapsed), with numbers compared as numbers. The rules, in order:

1. Unicode: NFKC (full-width digits and letters, ligatures, non-breaking spaces fold to their plain
   forms; a spacing acute accent "´" is read as an apostrophe first), then case-folded
   (``casefold``: "Straße" is "strasse"). Accents are kept, as SQuAD's and TriviaQA's scripts keep
   them: "café" is not "cafe" (in many languages an accent tells two words apart).
2. Dashes: hyphen, non-breaking hyphen, figure dash, en dash, em dash, horizontal bar and minus
   sign are one character, "-".
3. Numbers: a number not touching a word character on either side ("a1", "1st" are words) is written
   one way: thousands separators dropped ("1,000" is "1000"), trailing zeros and an integral
   ".0" dropped ("3.50" is "3.5", "3.0" is "3"), "+" and "-0" dropped; a "-" right before its
   digits and not after a word character is its sign ("-42", "−42", "–42" are "-42"; in "3-5"
   the dash follows "3", so it is a range, two numbers "3 5"). A number is a word of its own.
4. Punctuation (ASCII punctuation, every Unicode punctuation character: quotes straight and
   curly, guillemets, dashes, ellipses) and currency signs are removed, joining what they
   separate ("Don't" is "dont", "Campbell-Bannerman" is "campbellbannerman"), except that two
   numbers stay two ("3-5", "3/4" and "1:30" are "3 5", "3 4" and "1 30").
5. The articles a, an, the (whole words) are removed; whitespace collapsed.

Pure functions over strings, in ``decide`` with the clusters (:mod:`tfb_core.decide.generation`);
exact match's callers (the ``accuracy`` criterion of the sigma search, ``tfb eval``, the training
script) import it from here.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from decimal import Decimal

#: hyphen, non-breaking hyphen, figure dash, en dash, em dash, horizontal bar, minus sign, small
#: and full-width hyphen-minus (NFKC maps the last two to "-" already)
_DASHES = str.maketrans({c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d"})
#: the spacing acute accent, typed as an apostrophe ("Don´t"): NFKC would make it a space and a
#: combining accent, so it is an apostrophe first (TriviaQA's script counts it as punctuation)
_APOSTROPHES = str.maketrans({"\u00b4": "'"})
# a number: an optional sign, digits with thousands separators or plain, decimals; not touching a
# word character on either side (the sign not after one)
_NUMBER = re.compile(r"(?<!\w)(-|\+)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\w)")
_ARTICLES = frozenset({"a", "an", "the"})
_ASCII_PUNCT = frozenset(string.punctuation)


def _removed(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch) in ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sc")


def _number(sign: str | None, digits: str) -> str:
    value = Decimal((sign or "") + digits.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))  # 1000.0 -> 1000, -0 -> 0
    return format(value.normalize(), "f")  # 2.50 -> 2.5


def _words(text: str) -> list[str]:
    text = "".join(ch for ch in text if not _removed(ch))
    return [w for w in text.split() if w not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """``text``'s normal form under the module's rules (the key two answers are compared by)."""
    text = unicodedata.normalize("NFKC", text.translate(_APOSTROPHES)).casefold().translate(_DASHES)
    words: list[str] = []
    last = 0
    for m in _NUMBER.finditer(text):
        words += _words(text[last:m.start()]) + [_number(m.group(1), m.group(2))]
        last = m.end()
    words += _words(text[last:])
    return " ".join(words)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when ``prediction`` equals one of ``answers`` after :func:`normalize_answer`."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)
