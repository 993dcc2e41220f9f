"""Final answers out of reasoning output, and whether they match the gold answer.

A reasoning model writes `<think>…</think>` and then an answer in free form. As VLMEvalKit and Skywork's
own evaluation do, the answer is the text after the **last** `</think>` (:func:`final_answer`); a response
whose reasoning never closed has no final answer. In that text the answer span is found by priority: the
last `\\boxed{…}` (nested braces allowed), then the last "answer is X" / "Answer: X" phrase, then the whole
final text. From it an answer of the item's kind is read:

mc       one option letter, inferred as VLMEvalKit's `can_infer` does: a letter standing alone among the
         words ("B", "(B)", "B.", "option B", "\\boxed{B}"), else exactly one option's text in the answer
multi    a set of option letters ("A, C", "\\boxed{A, C}", "A and C"), compared as a set (LogicVista)
numeric  a number: signs, thousands commas, decimals, fractions (3/4, \\frac{3}{4}), %, $, units, degrees;
         equal when exact, within a relative 1e-6, or equal after rounding to the item's stated precision
math     a LaTeX expression, compared after the usual MATH normalisation, as numbers, and finally by
         `math-verify` (symbolic equivalence) when that package is installed
text     a short word or phrase, compared case- and punctuation-insensitively
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

KINDS = ("mc", "multi", "numeric", "math", "text")
LETTERS = "ABCDEFGHIJ"
THINK_END = "</think>"

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


# -- the final answer -------------------------------------------------------------------------------------


def final_answer(text: str, *, think_opened: bool = True) -> str | None:
    """The text after the last `</think>` (VLMEvalKit's and Skywork's rule), stripped.

    None when the reasoning never closed: the prompt opened `<think>` (`think_opened`) or the response
    opened it itself, and no `</think>` follows, so everything written is reasoning and no answer was given.
    """
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1].strip()
    if think_opened or text.lstrip().startswith("<think>"):
        return None
    return text.strip()


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


_PUNCT_TO_SPACE = str.maketrans({c: " " for c in ".()[],:;!*#{}$\\"})


def can_infer_option(text: str, n_options: int) -> str | None:
    """VLMEvalKit's `can_infer_option`: with punctuation made spaces, exactly one option letter stands alone
    among the words. A capital "A" in a longer text may be the article, so it is not trusted there."""
    words = text.translate(_PUNCT_TO_SPACE).split()
    found = [c for c in LETTERS[:n_options] if c in words]
    if len(found) != 1 or ("A" in words and len(words) > 3):
        return None
    return found[0]


def can_infer_text(text: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's `can_infer_text`: exactly one option's text occurs in the (lower-cased) answer."""
    low = text.lower()
    found = [LETTERS[i] for i, o in enumerate(options) if str(o).strip() and str(o).strip().lower() in low]
    return found[0] if len(found) == 1 else None


def extract_mc(text: str, options: Sequence[str]) -> str | None:
    """One option letter: a boxed letter or option, then VLMEvalKit's can_infer on the final text (letter,
    then option text), then the stated-answer phrases and the last line a judge model would read."""
    n = len(options)
    boxed = last_boxed(text)
    if boxed is not None:
        letter = option_letter(boxed, n) or _letter_of_content(boxed, options)
        if letter:
            return letter
    letter = can_infer_option(text, n) or can_infer_text(text, options)
    if letter:
        return letter
    span, _ = answer_span(text)
    for candidate in (span, text.strip().splitlines()[-1] if text.strip() else ""):
        letter = option_letter(candidate, n) or _letter_of_content(candidate, options)
        if letter:
            return letter
    for m in reversed(list(_LETTER_IN_TEXT.finditer(text))):
        letter = next(g for g in m.groups() if g).upper()
        if LETTERS.index(letter) < n:
            return letter
    return None


_LETTER_SET = re.compile(r"^\(?([A-J])\)?(?:\s*(?:,|;|&|\band\b|/)?\s*\(?([A-J])\)?)*$")


def letter_set(span: str, n_options: int) -> str | None:
    """A set of option letters written as the whole span ("A, C", "(A) and (C)", "AC", "B"), canonical as
    "A,C"; None when the span is anything else or names a letter beyond the options."""
    s = _clean_latex(span).strip().strip("*").strip().rstrip(".").strip()
    s = re.sub(r"^(?:options?|choices?|answers?)\s*:?\s*", "", s, flags=re.IGNORECASE)
    if re.fullmatch(r"[A-J]{2,}", s):  # "AC"
        letters = set(s)
    elif _LETTER_SET.fullmatch(s):
        letters = set(re.findall(r"[A-J]", s))
    else:
        return None
    if not letters or any(LETTERS.index(c) >= n_options for c in letters):
        return None
    return ",".join(sorted(letters))


def extract_multi(text: str, n_options: int) -> str | None:
    """A set of option letters: the last box, else a stated answer, else the last line."""
    span, how = answer_span(text)
    candidates = [span] if how != "text" else []
    candidates.append(text.strip().splitlines()[-1] if text.strip() else "")
    for candidate in candidates:
        found = letter_set(candidate, n_options)
        if found:
            return found
    return None


# -- the two entry points ----------------------------------------------------------------------------------


def extract_answer(text: str, kind: str, options: Sequence[str] = ()) -> str | None:
    """The answer a final answer text gives, canonical for `kind`: a letter, letters "A,C", a number (as a
    reduced fraction string), a normalised LaTeX string or normalised text. None when none can be read."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}")
    if not text.strip():
        return None
    if kind == "mc":
        return extract_mc(text, options)
    if kind == "multi":
        return extract_multi(text, len(options) or len(LETTERS))
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


def boxed_answer(text: str, kind: str, options: Sequence[str] = ()) -> str | None:
    """Like :func:`extract_answer`, from a complete `\\boxed{}` only (an answer cut off by the token budget
    is graded only when it already boxed its result)."""
    boxed = last_boxed(text)
    if boxed is None:
        return None
    return extract_answer(f"\\boxed{{{boxed}}}", kind, options)


def _last_number_text(text: str) -> str:
    cleaned = _clean_latex(text)
    found = list(_NUMBER.finditer(cleaned))
    return found[-1].group(0) if found else ""


def is_correct(
    pred: str | None,
    gold: str,
    kind: str,
    options: Sequence[str] = (),
    *,
    accept: Sequence[str] = (),
    decimals: int | None = None,
) -> bool:
    """Compare an :func:`extract_answer` result with the item's gold answer (or any of `accept`, further
    golds a benchmark allows). `decimals`: a numeric answer also matches when it rounds to the gold at that
    many decimal places (MathVista's `precision`)."""
    if pred is None:
        return False
    return any(_matches(pred, g, kind, decimals) for g in (gold, *accept))


def _matches(pred: str, gold: str, kind: str, decimals: int | None) -> bool:
    if kind == "mc":
        return pred.upper() == gold.strip().upper()
    if kind == "multi":
        return set(pred.split(",")) == set(re.findall(r"[A-J]", gold.upper()))
    if kind == "numeric":
        a, b = parse_number(pred), parse_number(gold)
        if a is None or b is None:
            return False
        if decimals is not None and round(float(a), decimals) == round(float(b), decimals):
            return True
        return numbers_equal(a, b)
    if kind == "math":
        g = normalize_math(gold)
        if pred == g:
            return True
        a, b = _plain_number(pred), _plain_number(g)
        if a is not None and b is not None:
            return numbers_equal(a, b)
        return latex_equivalent(pred, gold)
    return pred == normalize_text(gold)


def _plain_number(s: str) -> Fraction | None:
    """A number only when the whole normalised string is one (so "x+1" never equals "1")."""
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?|[-+]?\\frac\{[-+\d.]+\}\{[-+\d.]+\}", s):
        return parse_number(s)
    return None


# -- symbolic equivalence -----------------------------------------------------------------------------------


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


@lru_cache(maxsize=4096)
def latex_equivalent(pred: str, gold: str) -> bool:
    """Symbolic equivalence of two LaTeX answers by `math-verify` (False when it is not installed or cannot
    parse either side). Its time limits use SIGALRM, which only the main thread may set: elsewhere it runs
    without one."""
    mv = _math_verify()
    if mv is None:
        return False
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        parsed_gold = mv.parse(f"${gold}$", parsing_timeout=limit)
        parsed_pred = mv.parse(f"${pred}$", parsing_timeout=limit)
        if not parsed_gold or not parsed_pred:
            return False
        return bool(mv.verify(parsed_gold, parsed_pred, timeout_seconds=limit))
    except Exception:  # math-verify's parser and sympy raise many types on odd input; not equivalent then
        return False
