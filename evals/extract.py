"""Reading a numeric answer out of generated text, and comparing it with the target.

The last number in the text wins. A number may carry a sign (`-`, `+`, `−`), thousands separators
(`1,000` is one thousand, not 1 followed by 000) and a decimal part; words around it are ignored.
A sign directly after a digit is read as an operator (`5-3` holds 5 and 3), so only a sign that
starts the text or follows a non-digit makes a number negative.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(
    r"""
    (?<![\d.])                       # not the tail of a longer number; a sign after a
    (?P<sign>[-+\u2212]?)            # digit is an operator, so the match starts after it
    (?P<body>
        \d{1,3}(?:,\d{3})+(?!\d|,\d)  # 1,000 / 12,345,678: groups of three only
        (?:\.\d+)?
      | \d+(?:\.\d+)?
      | \.\d+
    )
    """,
    re.VERBOSE,
)


def canonical_number(text: str) -> str | None:
    """`text` as a canonical decimal string ('1,000.50' -> '1000.5'), or None if not a number."""
    text = text.strip().replace("\u2212", "-").replace(",", "")
    if text.isascii() and text.isdigit():  # the common case, without Decimal
        return str(int(text))
    if not text:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The last number in `text`, canonical ('The total is $1,000.' -> '1000'), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, body = matches[-1]
    return canonical_number(sign + body)


def first_line(text: str) -> str:
    """The generated text up to its first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()


@functools.lru_cache(maxsize=1 << 16)  # candidates mostly give the same answers
def answer_matches(response: str, target: str) -> bool:
    """Numeric targets compare with the last number of the response; others as stripped text."""
    expected = canonical_number(target)
    if expected is not None:
        return extract_number(response) == expected
    return first_line(response) == target.strip()
