"""Benchmark loaders: the JSONL shapes of the real sets, VLMEvalKit TSV, bad rows with line numbers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from r1v_quant.evaluate.answers import extract_answer, is_correct
from r1v_quant.evaluate.bench_load import load_bench
from r1v_quant.evaluate.bench_sets import BUILTIN, MC_INSTRUCTION
from r1v_quant.util.errors import R1VError


def _png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_shapes(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png())
    f = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            # MATH-Vision: answer letter, options, <image1> tag, subject
            {
                "id": "4",
                "question": "Which one?\n<image1>",
                "options": ["1", "2", "3", "4", "5"],
                "answer": "C",
                "image": "images/a.png",
                "subject": "counting",
            },
            # PuzzleVQA: answer is one option's value (here an int), category
            {
                "image": "images/a.png",
                "question": "Missing number?",
                "options": [6, 3, 4, 2],
                "answer": 4,
                "category": "circle_size_number",
            },
            # GSM8K: worked answer ending in #### N (thousands comma)
            {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"},
            # MATH-500
            {
                "problem": "Simplify.",
                "answer": "\\frac{14}{3}",
                "subject": "Algebra",
                "unique_id": "test/a/1.json",
            },
            # generic free text
            {"question": "<image>\nWhat colour?", "answer": "red", "images": ["images/a.png"]},
        ],
    )
    bench = load_bench(str(f))
    mv, pz, gsm, math500, generic = bench.items
    assert (mv.kind, mv.answer, mv.category, mv.id) == ("mc", "C", "counting", "4")
    assert mv.question.startswith("Which one?\n<image>\nOptions:") and "<image1>" not in mv.question
    assert "A. 1\nB. 2" in mv.question and mv.question.endswith(MC_INSTRUCTION)
    assert mv.images == [tmp_path / "images" / "a.png"]
    assert (pz.kind, pz.answer, pz.options) == ("mc", "C", ["6", "3", "4", "2"])
    assert (gsm.kind, gsm.answer, gsm.category, gsm.images) == ("numeric", "1004", "mixed", [])
    assert (math500.kind, math500.answer, math500.category) == ("math", "\\frac{14}{3}", "Algebra")
    assert (generic.kind, generic.question.count("<image>")) == ("text", 1)
    assert [b.where for b in bench.bad] == [] and bench.total_rows == 5


def test_bad_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"question": "ok?", "answer": "1"},
            "{not json",
            "   ",
            {"question": "", "answer": "1"},
            {"question": "no answer"},
            {"question": "q", "answer": "7", "options": ["1", "2"]},
            {"question": "q", "answer": "1", "image": "missing.png"},
            {"question": "q", "answer": "2"},
        ],
    )
    with pytest.raises(R1VError) as e:
        load_bench(str(f))
    msg = str(e.value)
    assert "6 bad row(s)" in msg and "--skip-bad" in msg
    for n in (2, 3, 4, 5, 6):
        assert f"b.jsonl:{n}:" in msg
    bench = load_bench(str(f), skip_bad=True)
    assert [i.answer for i in bench.items] == ["1", "2"]
    reasons = {b.where: b.reason for b in bench.bad}
    assert reasons["b.jsonl:2"].startswith("not valid JSON")
    assert reasons["b.jsonl:3"] == "empty row"
    assert "no question" in reasons["b.jsonl:4"] and reasons["b.jsonl:5"] == "no answer"
    assert "neither an option letter" in reasons["b.jsonl:6"]
    assert reasons["b.jsonl:7"] == "image missing.png not found"


def test_vlmevalkit_tsv(tmp_path: Path) -> None:
    img = base64.b64encode(_png("blue")).decode()
    lines = [
        "index\timage\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory",
        f"0\t{img}\tWhat colour is it?\tLook closely.\tred\tblue\tgreen\t\tB\tcolour",
        "1\t0\tSame picture: which colour?\tnan\tred\tblue\t\t\tB\tcolour",  # image refers to row 0
        "2\tnot-base64!!\tBroken image?\t\tx\ty\t\t\tA\tcolour",
        f"3\t{img}\tHow many sides?\t\t\t\t\t\t4\tcount",
    ]
    f = tmp_path / "bench.tsv"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(R1VError, match="bench.tsv:4: image column is not valid base64"):
        load_bench(str(f))
    bench = load_bench(str(f), skip_bad=True)
    a, b, c = bench.items
    assert (a.kind, a.answer, a.options, a.category) == ("mc", "B", ["red", "blue", "green"], "colour")
    assert a.question.startswith("<image>\nHint: Look closely.\nWhat colour is it?\nOptions:\nA. red")
    assert isinstance(a.images[0], bytes) and b.images == a.images
    assert (c.kind, c.answer, c.options) == ("numeric", "4", [])


def test_builtin_tiny_set_and_limit() -> None:
    bench = load_bench("builtin:tiny")
    n_text, n_image = BUILTIN["builtin:tiny"]
    assert len(bench.items) == n_text + n_image
    assert {i.kind for i in bench.items} == {"numeric", "text"}
    assert {"color", "shape"} <= set(bench.categories())
    # the replica's worked answers grade as correct against their own items
    from r1v_quant.data.synthdata import text_problems

    p = text_problems(1, 90_101)[0]
    item = bench.items[0]
    assert is_correct(
        extract_answer(f"The answer is \\boxed{{{p.answer}}}.", item.kind), item.answer, item.kind
    )
    sub = load_bench("builtin:tiny", limit=10, seed=3)
    assert len(sub.items) == 10 and [i.id for i in sub.items] == [
        i.id for i in load_bench("builtin:tiny", limit=10, seed=3).items
    ]
    assert [i.id for i in sub.items] != [i.id for i in load_bench("builtin:tiny", limit=10, seed=4).items]
    order = [i.id for i in bench.items]
    assert [order.index(i.id) for i in sub.items] == sorted(order.index(i.id) for i in sub.items)


def test_unknown_bench() -> None:
    with pytest.raises(R1VError, match="no such file"):
        load_bench("/nonexistent/bench.jsonl")


def test_real_shared_sets_load(shared_data: Path) -> None:
    """The public sets in ../shared/data load completely, with the right answer kinds."""
    expect = {
        "gsm8k": (1319, {"numeric"}),
        "math500": (500, {"math"}),
        "math_vision_testmini": (304, {"mc", "numeric", "math", "text"}),
        "puzzlevqa_subset": (200, {"mc"}),
    }
    for name, (n, kinds) in expect.items():
        bench = load_bench(str(shared_data / name))
        assert len(bench.items) == n and not bench.bad, name
        assert {i.kind for i in bench.items} <= kinds, name
    mv = load_bench(str(shared_data / "math_vision_testmini"))
    assert sum(i.kind == "mc" for i in mv.items) == 190
    assert all(len(i.images) == 1 and i.images[0].is_file() for i in mv.items)
    gsm = load_bench(str(shared_data / "gsm8k"))
    assert gsm.items[0].answer == "18"
