"""Final answers out of reasoning output, and whether they match the gold answer.

A reasoning model writes `<think>…</think>` and then an answer in free form. The answer span is found by
priority: the last `\\boxed{…}` (nested braces allowed), then the last "answer is X" / "Answer: X" phrase,
then the whole final text. From that span an answer of the item's kind is read:

mc       an option letter ("B", "(B)", "B.", "option B", "\\text{(B)}"), or an option's text / value
numeric  a number: signs, thousands commas, decimals, fractions (3/4, \\frac{3}{4}), %, $, units, degrees
math     a LaTeX expression, compared after the usual MATH normalisation (or as numbers when both are)
text     a short word or phrase, compared case- and punctuation-insensitively
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

KINDS = ("mc", "numeric", "math", "text")
LETTERS = "ABCDEFGHIJ"

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|answer|correct\s+(?:option|choice)|option|choice)\s*(?:is|:|=)\s*:?\s*(.+)",
    re.IGNORECASE,
)
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])"
    r"|(?<![\w.])[-+]?\.\d+"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}|\\[dt]?frac\s*(\d)\s*(\d)")
_LETTER_ALONE = re.compile(
    r"^\s*(?:\\text(?:bf)?\{)?\s*(?:option|choice)?\s*[\(\[]?\s*([A-J])\s*[\)\]]?\s*\}?\s*(?:[.:)]|$|\s)",
    re.IGNORECASE,
)
_LETTER_IN_TEXT = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?\*{0,2}([A-J])\*{0,2}[\)\]]?(?![A-Za-z])"
    r"|^\s*\*{0,2}\(?([A-J])[\).:]\*{0,2}(?:\s|$)"
    r"|\(([A-J])\)",
    re.IGNORECASE | re.MULTILINE,
)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` (balanced braces), or of `\\boxed X`."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    bare = _BOXED_BARE.findall(text)
    return bare[-1].strip() if bare else None


def answer_span(text: str) -> tuple[str, str]:
    """(span, how): the part of a final answer that holds the answer, and which rule found it."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        span = phrases[-1].strip()
        span = re.split(r"(?<=[^\d\s])\.\s|\.$|\n", span)[0]  # up to the end of the sentence
        return span.strip().strip("*").strip(), "phrase"
    return text.strip(), "text"


# -- numbers --------------------------------------------------------------------------------------------


def _clean_latex(s: str) -> str:
    s = s.replace("\u2212", "-").replace("\u2013", "-")  # unicode minus / en dash
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = (
        s.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\ ", " ")
    )
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    return s.strip()


def parse_number(s: str) -> Fraction | None:
    """The first number in `s` as an exact Fraction (thousands commas, decimals, a/b, \\frac, sign)."""
    s = _clean_latex(s)
    m = _FRAC.search(s)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        a, b = parse_number(num), parse_number(den)
        if a is not None and b not in (None, 0):
            sign = -1 if s[: m.start()].strip().endswith("-") else 1
            return sign * a / b
    m = _NUMBER.search(s)
    if not m:
        return None
    text = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            a, b = text.split("/")
            return None if Fraction(b) == 0 else Fraction(a) / Fraction(b)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: Fraction, b: Fraction, rel: float = 1e-6) -> bool:
    """Exact for rationals; decimals written to fewer places match within a relative tolerance."""
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


# -- strings ----------------------------------------------------------------------------------------------


def normalize_math(s: str) -> str:
    """MATH-style normalisation (Hendrycks' strip_string, abridged): spacing, \\left/\\right, dfrac,
    units in \\text, degrees, a leading `x =`, trailing period."""
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\\text\s*\{\s*(?:cm|m|km|units?|inches|inch|feet|ft|degrees?|dollars?)\s*\}", "", s)
    s = _clean_latex(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 3" -> "3"
    s = s.replace(" ", "").replace("\n", "")
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1]
    return s.rstrip(".")


def normalize_text(s: str) -> str:
    s = _clean_latex(s).lower()
    s = re.sub(r"[^\w\s]", " ", s)
    s = re.sub(r"\b(?:the|a|an)\b", " ", s)
    return " ".join(s.split())


# -- options ----------------------------------------------------------------------------------------------


def option_letter(span: str, n_options: int) -> str | None:
    """An option letter written as the whole span ("B", "(B)", "B.", "B) 12", "option B", "\\text{B}")."""
    m = _LETTER_ALONE.match(_clean_latex(span).strip("*").strip())
    if m and LETTERS.index(m.group(1).upper()) < n_options:
        return m.group(1).upper()
    return None


def _is_number_text(s: str) -> bool:
    return re.fullmatch(r"[-+\d.,/\s]+", _clean_latex(s)) is not None


def _letter_of_content(span: str, options: Sequence[str]) -> str | None:
    """The option whose text (or value) the span states."""
    want_t, want_n = normalize_text(span), parse_number(span)
    hits = [i for i, o in enumerate(options) if normalize_text(str(o)) == want_t and want_t]
    # a number matches a numeric option only when the span is just that number (not "3 of the 5 circles")
    if not hits and want_n is not None and _is_number_text(span):
        hits = [
            i
            for i, o in enumerate(options)
            if _is_number_text(str(o))
            and (n := parse_number(str(o))) is not None
            and numbers_equal(n, want_n)
        ]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def extract_mc(text: str, options: Sequence[str]) -> str | None:
    span, _ = answer_span(text)
    n = len(options)
    for candidate in (span, text.strip().splitlines()[-1] if text.strip() else ""):
        letter = option_letter(candidate, n) or _letter_of_content(candidate, options)
        if letter:
            return letter
    for m in reversed(list(_LETTER_IN_TEXT.finditer(text))):
        letter = next(g for g in m.groups() if g).upper()
        if LETTERS.index(letter) < n:
            return letter
    return None


# -- the two entry points ----------------------------------------------------------------------------------


def extract_answer(text: str, kind: str, options: Sequence[str] = ()) -> str | None:
    """The answer a response gives, canonical for `kind`: a letter, a number (as a reduced fraction
    string), a normalised LaTeX string or normalised text. None when no answer can be read."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}")
    if not text.strip():
        return None
    if kind == "mc":
        return extract_mc(text, options)
    span, how = answer_span(text)
    if kind == "numeric":
        # a boxed or stated answer is read as written; free text falls back to its last number
        n = parse_number(span) if how != "text" else None
        if n is None:
            n = parse_number(_last_number_text(text))
        return None if n is None else str(n)
    if kind == "math":
        return normalize_math(span) or None
    return normalize_text(span) or None


def _last_number_text(text: str) -> str:
    cleaned = _clean_latex(text)
    found = list(_NUMBER.finditer(cleaned))
    return found[-1].group(0) if found else ""


def is_correct(pred: str | None, gold: str, kind: str, options: Sequence[str] = ()) -> bool:
    """Compare an :func:`extract_answer` result with the item's gold answer."""
    if pred is None:
        return False
    if kind == "mc":
        return pred.upper() == gold.strip().upper()
    if kind == "numeric":
        a, b = parse_number(pred), parse_number(gold)
        return a is not None and b is not None and numbers_equal(a, b)
    if kind == "math":
        g = normalize_math(gold)
        if pred == g:
            return True
        a, b = _plain_number(pred), _plain_number(g)
        return a is not None and b is not None and numbers_equal(a, b)
    return pred == normalize_text(gold)


def _plain_number(s: str) -> Fraction | None:
    """A number only when the whole normalised string is one (so "x+1" never equals "1")."""
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?|[-+]?\\frac\{[-+\d.]+\}\{[-+\d.]+\}", s):
        return parse_number(s)
    return None
