"""One normalisation of short answers (tfb_core.decide.answers) for exact match and for the clusters
of N answers: its rules on quotes, dashes, numbers, Unicode, articles and whitespace, against
hand-written forms, and the two users agreeing on every pair."""

from __future__ import annotations

import itertools

import pytest

from tfb_core.decide.answers import exact_match, normalize_answer
from tfb_core.decide.generation import cluster_answers

FORMS = [
    # quotes, straight and curly; guillemets; an apostrophe inside a word joins it
    ("\u201cParis\u201d", "paris"), ('"Paris"', "paris"), ("'Paris'", "paris"), ("\u2018Paris\u2019", "paris"),
    ("\u00abParis\u00bb", "paris"), ("Don't", "dont"), ("Don\u2019t", "dont"), ("`Hamlet\u00b4", "hamlet"),
    # dashes between words join them; between numbers, two numbers (a range); before a number, its sign
    ("Campbell-Bannerman", "campbellbannerman"), ("Campbell\u2013Bannerman", "campbellbannerman"),
    ("3-5", "3 5"), ("3\u20135", "3 5"), ("3\u20145", "3 5"), ("3\u22125", "3 5"), ("3 - 5", "3 5"),
    ("-42", "-42"), ("\u221242", "-42"), ("\u201342", "-42"), ("\u201442", "-42"), ("x -5", "x -5"),
    # other punctuation between numbers keeps them apart, too
    ("3/4", "3 4"), ("1:30", "1 30"), ("1,2", "1 2"),
    # numbers written one way
    ("1,000", "1000"), ("1000.0", "1000"), ("1,000.00", "1000"), ("3.0", "3"), ("3.50", "3.5"), (".5", "0.5"),
    ("+7", "7"), ("-0", "0"), ("-0.0", "0"), ("-1,000.50", "-1000.5"), ("$1,000.", "1000"), ("\u20ac5", "5"),
    ("96.", "96"), ("50%", "50"), ("1,234,567", "1234567"), ("(42)", "42"),
    ("a1 b2", "a1 b2"), ("1st", "1st"),  # digits touching letters are words
    ("The answer is 42.", "answer is 42"),
    # Unicode: NFKC (full-width, ligatures, no-break space), case-folded, accents kept
    ("\uff11\uff10\uff10\uff10", "1000"), ("\ufb01ne", "fine"), ("New\u00a0York", "new york"),
    ("STRASSE", "strasse"), ("Stra\u00dfe", "strasse"), ("Caf\u00e9", "caf\u00e9"),
    ("Cafe\u0301", "caf\u00e9"),  # a combining accent composes (NFKC)
    # articles, whole words only; whitespace collapsed
    ("The Beatles", "beatles"), ("an apple", "apple"), ("A  tale of   two cities", "tale of two cities"),
    ("Theatre", "theatre"), ("a an the", ""), ("", ""), ("  The  QUICK,\tbrown\nfox!  ", "quick brown fox"),
]


@pytest.mark.parametrize("text, key", FORMS)
def test_normalize_answer(text, key):
    assert normalize_answer(text) == key


@pytest.mark.parametrize("a, b", [
    ("-42", "42"), ("1000", "100"), ("3.5", "35"), ("0.5", "5"), ("3-5", "35"), ("3-5", "-2"), ("12", "1 2"),
    ("the end", "end game"), ("Bob Russell", "Bobby Scott"), ("Caf\u00e9", "Cafe"),
])
def test_different_answers_stay_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)
    assert not exact_match(a, [b])


def test_exact_match_any_alias():
    assert exact_match("Sunset Boulevard", ["Sunset Blvd", "Sunset Boulevard"])
    assert exact_match(" 1,095 ", ["1095"]) and exact_match("\u2212306", ["-306"])
    assert not exact_match("306", ["-306"]) and not exact_match("The answer is 96", ["96"])
    assert not exact_match("anything", [])


def test_exact_match_and_the_clusters_agree_on_every_pair():
    """The issue's two cases (a curly-quoted "Paris", a range "3-5") and every pair of the forms
    above: two answers share a cluster exactly when one matches the other."""
    texts = [t for t, _ in FORMS] + ["paris", "35", "3 5"]
    assert exact_match("\u201cParis\u201d", ["paris"]) and len(cluster_answers(["\u201cParis\u201d", "paris"]).clusters) == 1
    assert not exact_match("3-5", ["35"]) and len(cluster_answers(["3-5", "35"]).clusters) == 2
    for a, b in itertools.combinations(texts, 2):
        assert (len(cluster_answers([a, b]).clusters) == 1) == exact_match(a, [b]), (a, b)
