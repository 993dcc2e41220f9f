"""Answer extraction from reasoning output, table-driven, and grading against gold answers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from r1v_quant.evaluate.answers import extract_answer, is_correct, last_boxed, parse_number

OPTS4 = ("12", "15", "18", "21")
COLORS = ("red", "blue", "green", "yellow")

# (response after </think>, kind, options, extracted, gold, correct)
CASES = [
    # boxed, with nested braces, wins over everything else
    ("The answer is \\boxed{18}.", "numeric", (), "18", "18", True),
    ("First 12, then \\boxed{\\frac{3}{4}} is final.", "numeric", (), "3/4", "0.75", True),
    (
        "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "math",
        (),
        "(3,\\frac{\\pi}{2})",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        True,
    ),
    (
        "so \\boxed{x^{2+{1}}} and not \\boxed{y}? no: \\boxed{x^{2+{1}}}",
        "math",
        (),
        "x^{2+{1}}",
        "x^{2+{1}}",
        True,
    ),
    ("\\boxed{\\dfrac{1}{2}}", "math", (), "\\frac{1}{2}", "\\frac12", True),
    ("\\boxed{0.5}", "math", (), "0.5", "\\frac{1}{2}", True),
    ("\\boxed{x = 5}", "math", (), "5", "x=5", True),
    ("\\boxed{90^\\circ}", "math", (), "90", "90^\\circ", True),
    ("\\boxed{\\text{Evelyn}}", "math", (), "Evelyn", "\\text{Evelyn}", True),
    ("\\boxed{p-q}", "math", (), "p-q", "q - p", False),
    # "Answer:" / "the answer is" phrases, units, signs, thousands commas
    ("Answer: (B)", "mc", OPTS4, "B", "B", True),
    ("Thinking done. The answer is 42 cm.", "numeric", (), "42", "42", True),
    ("the answer is -7 degrees", "numeric", (), "-7", "-7", True),
    ("Final answer: 1,234,567", "numeric", (), "1234567", "1234567", True),
    ("So she makes $18.00 every day.", "numeric", (), "18", "18", True),
    ("The probability is 3/8", "numeric", (), "3/8", "0.375", True),
    ("It grows by 50%.", "numeric", (), "50", "50", True),
    ("The result is −12.", "numeric", (), "-12", "-12", True),
    ("\\boxed{\\$1,000}", "numeric", (), "1000", "1000", True),
    ("There are 2 rows of 3, so 6 in total.", "numeric", (), "6", "7", False),
    # option letters in every usual spelling, and option contents
    ("B. Because the sides are equal.", "mc", OPTS4, "B", "B", True),
    ("I am confident the answer is C", "mc", OPTS4, "C", "D", False),
    ("\\boxed{D}", "mc", OPTS4, "D", "D", True),
    ("\\boxed{(A)}", "mc", OPTS4, "A", "A", True),
    ("\\boxed{\\text{(C)}}", "mc", OPTS4, "C", "C", True),
    ("The correct option is **B**.", "mc", OPTS4, "B", "B", True),
    ("\\boxed{18}", "mc", OPTS4, "C", "C", True),  # the option's value
    ("The missing colour is blue.\n\\boxed{blue}", "mc", COLORS, "B", "B", True),
    ("Answer: option D", "mc", OPTS4, "D", "D", True),
    ("\\boxed{F}", "mc", OPTS4, None, "A", False),  # no option F among four
    # free text answers
    ("The image shows a red square.\n\nThe answer is \\boxed{red}.", "text", (), "red", "red", True),
    ("The answer is \\boxed{Circle}.", "text", (), "circle", "circle", True),
    ("The answer is \\boxed{square}.", "text", (), "square", "circle", False),
    ("", "numeric", (), None, "1", False),
]


@pytest.mark.parametrize(("text", "kind", "options", "extracted", "gold", "correct"), CASES)
def test_extraction_table(
    text: str, kind: str, options: tuple[str, ...], extracted: str | None, gold: str, correct: bool
) -> None:
    got = extract_answer(text, kind, options)
    assert got == extracted
    assert is_correct(got, gold, kind, options) is correct


def test_last_boxed_nesting_and_unbalanced() -> None:
    assert last_boxed("\\boxed{a} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{a}{b}}}") == "\\sqrt{\\frac{a}{b}}"
    # an unclosed last box (cut off) falls back to the previous complete one
    assert last_boxed("\\boxed{5} and \\boxed{6") == "5"
    assert last_boxed("\\boxed 7") == "7"
    assert last_boxed("no box here") is None


def test_parse_number_forms() -> None:
    assert parse_number("\\frac{-3}{4}") == Fraction(-3, 4)
    assert parse_number("-\\frac{3}{4}") == Fraction(-3, 4)
    assert parse_number("\\dfrac34") == Fraction(3, 4)
    assert parse_number("1,000,000.5") == Fraction(2000001, 2)
    assert parse_number("values 1, 2, 3") == 1  # a list is not a thousands number
    assert parse_number(".5") == Fraction(1, 2)
    assert parse_number("x") is None
    assert parse_number("1/0") is None


def test_vlmevalkit_can_infer_rules() -> None:
    from r1v_quant.evaluate.answers import can_infer_option, can_infer_text

    assert can_infer_option("I think it is (C).", 4) == "C"
    assert can_infer_option("B or C", 4) is None  # two letters: ambiguous
    assert can_infer_option("A cat sits on the mat", 4) is None  # "A" as the article in a longer text
    assert can_infer_option("A", 4) == "A"
    assert can_infer_text("it is clearly the blue one", COLORS) == "B"
    assert can_infer_text("red or blue", COLORS) is None
    # a boxed option wins over letters elsewhere in the final answer; then the letter, then the option text
    assert extract_answer("Not A. \\boxed{C}", "mc", OPTS4) == "C"
    assert extract_answer("The shape is green.", "mc", COLORS) == "C"


def test_budget_cut_answers_count_only_when_boxed() -> None:
    from r1v_quant.evaluate.answers import boxed_answer

    assert boxed_answer("so \\boxed{12} and then I", "numeric") == "12"
    assert boxed_answer("The answer is 12 and", "numeric") is None
    assert boxed_answer("\\boxed{1", "numeric") is None  # the box itself was cut


def test_accepted_answers_and_precision() -> None:
    assert is_correct("7", "5", "numeric", accept=["7"])
    assert not is_correct("7", "5", "numeric", accept=["6"])
    assert is_correct("3.14", "3.1416", "numeric", decimals=2)
    assert not is_correct("3.14", "3.1416", "numeric")  # exact (1e-6 relative) without a stated precision


def test_math_verify_equivalence() -> None:
    pytest.importorskip("math_verify")
    # equal only symbolically: a mixed number and an improper fraction, reordered sums, sqrt forms
    assert is_correct(extract_answer("\\boxed{4\\frac{2}{3}}", "math"), "\\frac{14}{3}", "math")
    assert is_correct(extract_answer("\\boxed{1+x^2}", "math"), "x^2+1", "math")
    assert is_correct(extract_answer("\\boxed{\\sqrt{200}}", "math"), "10\\sqrt{2}", "math")
    assert not is_correct(extract_answer("\\boxed{q-p}", "math"), "p-q", "math")
