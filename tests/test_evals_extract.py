"""Answer extraction for the bundled generate_until tasks."""

from __future__ import annotations

import pytest

from evomerge.evals.extract import answer_matches, canonical_number, extract_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),  # Sakana's released evaluator reads this as 0
        ("The answer is 1,000.", "1000"),
        ("12,345,678 people", "12345678"),
        ("$1,234.50", "1234.5"),
        ("-5", "-5"),
        ("x = -3.5 apples", "-3.5"),
        ("\u22128", "-8"),  # unicode minus
        ("+7", "7"),
        ("0.10", "0.1"),
        (".5 cup", "0.5"),
        ("3.", "3"),
        ("-0", "0"),
        ("42 apples and 7 pears", "7"),  # the last number wins
        ("7 pears, 42 apples", "42"),
        ("3,000 apples, 4 pears", "4"),
        ("I have 1,000, yes", "1000"),
        ("5-3", "3"),  # a sign after a digit is an operator
        ("2023-10-05", "5"),
        ("12,34", "34"),  # not groups of three: two numbers
        ("answer42", "42"),
        ("so 18\nthen more words", "18"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_canonical_number():
    assert canonical_number("1,000") == "1000"
    assert canonical_number(" 2.50 ") == "2.5"
    assert canonical_number("1e3") == "1000"
    assert canonical_number("abc") is None
    assert canonical_number("nan") is None
    assert canonical_number("") is None


def test_answer_matches_numbers_and_text():
    assert answer_matches("The total is 1,000.", "1000")
    assert answer_matches("1000.0", "1,000")
    assert not answer_matches("10000", "1000")
    assert not answer_matches("no idea", "3")
    assert answer_matches("  abc\nxyz", "abc")  # text targets: the first line, stripped
    assert not answer_matches("abcd", "abc")
