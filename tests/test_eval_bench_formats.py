"""Benchmarks in their published formats, each on a fixture written here in that exact layout (field names,
types, quirks): VLMEvalKit TSV, LogicVista dataset.json, We-Math testmini.json, the Hub's MathVista and
MMMU parquet; the NAME:PATH presets; one-line errors for unknown shapes; the real files in ../shared."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from r1v_quant.evaluate.answers import extract_answer, final_answer, is_correct
from r1v_quant.evaluate.bench_load import load_bench
from r1v_quant.evaluate.bench_sets import MULTI_INSTRUCTION
from r1v_quant.util.errors import R1VError


def _png(color: str = "red", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _b64(color: str) -> str:
    return base64.b64encode(_png(color)).decode()


def test_vlmevalkit_tsv_mathvista_and_mmmu_rows(tmp_path: Path) -> None:
    """MathVista_MINI.tsv (choices literal, question_type, answer_type, precision, answer_option, the query
    already listing the choices) and MMMU_DEV_VAL.tsv (Python-literal multi-image cells, <image N> tags)."""
    red, blue = _b64("red"), _b64("blue")
    head = ["index", "image", "question", "hint", "A", "B", "C", "answer", "choices", "question_type",
            "answer_type", "precision", "answer_option", "category"]  # fmt: skip
    query = (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
        "end.\nQuestion: Which is bigger?\nChoices:\n(A) 3\n(B) 5"
    )
    rows = [
        # MathVista multiple choice: answer is the option's text, answer_option its letter
        ["1", red, query, "nan", "", "", "", "5", "['3', '5']", "multi_choice", "text", "nan", "B", "math"],
        # MathVista free form: a float to 1 decimal place
        ["2", red, "What is the length?", "nan", "", "", "", "1.5", "nan", "free_form", "float", "1.0", "nan",
         "geometry"],
        # MMMU-style: two images as a Python-literal list, tags interleaved, options in A-C columns
        ["3", f"['{red}', '{blue}']", "Compare <image 1> with <image 2>: which is red?", "nan", "left",
         "right", "neither", "A", "nan", "nan", "nan", "nan", "nan", "Art"],
        # choices as a Python-literal dict
        ["4", blue, "Colour?", "nan", "", "", "", "B", "{'A': 'red', 'B': 'blue'}", "nan", "nan", "nan",
         "nan", "colour"],
        # a broken multi-image cell: not a literal
        ["5", f"['{red}', ", "Broken?", "nan", "x", "y", "", "A", "nan", "nan", "nan", "nan", "nan",
         "colour"],
    ]  # fmt: skip
    f = tmp_path / "MathVista_MINI.tsv"
    with open(f, "w", newline="", encoding="utf-8") as out:  # as VLMEvalKit dumps: every cell quoted
        csv.writer(out, delimiter="\t", quoting=csv.QUOTE_ALL).writerows([head, *rows])
    with pytest.raises(R1VError, match=r"MathVista_MINI.tsv:10: image column starts with '\['"):
        load_bench(str(f))
    bench = load_bench(str(f), skip_bad=True)
    mc, free, mmmu, dict_choices = bench.items
    assert (mc.kind, mc.answer, mc.options) == ("mc", "B", ["3", "5"])
    assert "Options:" not in mc.question and mc.question.count("(A) 3") == 1  # listed once, by the query
    assert (free.kind, free.answer, free.decimals, free.category) == ("numeric", "1.5", 1, "geometry")
    assert is_correct(extract_answer("\\boxed{1.54}", "numeric"), free.answer, "numeric", decimals=1)
    assert not is_correct(extract_answer("\\boxed{1.56}", "numeric"), free.answer, "numeric", decimals=1)
    assert mmmu.question.startswith("Compare <image> with <image>: which is red?\nOptions:\nA. left")
    assert [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in mmmu.images] == [(255, 0, 0), (0, 0, 255)]
    assert (dict_choices.kind, dict_choices.answer, dict_choices.options) == ("mc", "B", ["red", "blue"])
    assert [b.where for b in bench.bad] == ["MathVista_MINI.tsv:10"] and bench.total_rows == 5


def test_tag_order_repeats_and_untagged_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "b.png").write_bytes(_png("blue"))
    (tmp_path / "c.png").write_bytes(_png("green"))
    rows = [
        # image 2 named first, image 1 later, image 3 never: 3 goes before the text; a repeat stays text
        {
            "question": "See <image 2>, then <image1>; again <image 2>.",
            "answer": "x",
            "images": ["a.png", "b.png", "c.png"],
        },  # fmt: skip
        # a tag beyond the images stays as written (MATH-Vision's inline icons)
        {"question": "The ant <image1> walks home <image2>.", "answer": "4", "image": "a.png"},
    ]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_bench(str(f)).items
    assert a.question.startswith("<image>\nSee <image>, then <image>; again <image 2>.")
    assert a.images == [tmp_path / "c.png", tmp_path / "b.png", tmp_path / "a.png"]
    assert b.question.startswith("The ant <image> walks home <image2>.") and len(b.images) == 1


def test_logicvista_dataset_json(tmp_path: Path) -> None:
    """data/dataset.json as LogicVista ships it: an object keyed v1_N, multi-letter and numeric answers."""
    data = tmp_path / "LogicVista" / "data"
    (data / "images").mkdir(parents=True)
    items = {
        "v1_0": {"imagename": "v1_0.png", "question": "Which choice (A, B, C, or D) fits the pattern?",
                 "answer": "C", "reasoning": "...", "skill": ["inductive"], "broad_capability": ["diagram"],
                 "specific_capability": ["patterns"]},
        "v1_1": {"imagename": "v1_1.png", "question": "Which choices in the image (A-D) belong to the green "
                 "category?", "answer": "A, C", "skill": ["inductive"]},
        "v1_20": {"imagename": "v1_20.png", "question": "Which is the correct answer? Select from 1-5",
                  "answer": "3", "skill": ["deductive"]},
        "v1_4": {"imagename": "v1_4.png", "question": "Who is the odd-one-out? Select answers from A-I",
                 "answer": "G", "skill": ["inductive"]},
        "v1_9": {"question": "No image name", "answer": "A"},
    }  # fmt: skip
    for k in items:
        if k != "v1_9":
            (data / "images" / f"{k}.png").write_bytes(_png())
    (data / "dataset.json").write_text(json.dumps(items, indent=4))
    with pytest.raises(R1VError, match="dataset.json:v1_9: missing field 'imagename'"):
        load_bench(f"logicvista:{tmp_path / 'LogicVista'}")
    bench = load_bench(f"logicvista:{tmp_path / 'LogicVista'}", skip_bad=True)
    assert bench.name == "logicvista" and len(bench.bad) == 1
    single, multi, number, wide = bench.items
    assert (single.kind, single.answer, len(single.options), single.category) == ("mc", "C", 4, "inductive")
    assert "Options:" not in single.question and single.question.startswith("<image>\nWhich choice")
    assert (multi.kind, multi.answer, len(multi.options)) == ("multi", "A,C", 4)
    assert multi.question.endswith(MULTI_INSTRUCTION)
    assert (number.kind, number.answer) == ("numeric", "3")
    assert (wide.kind, wide.answer, len(wide.options)) == ("mc", "G", 9)
    # the plain folder and the file load the same items
    assert [i.id for i in load_bench(str(data / "dataset.json"), skip_bad=True).items] == [
        i.id for i in bench.items
    ]
    # multi-answer sets compare as sets, whatever the spelling; a subset is wrong
    for text, ok in [("\\boxed{C, A}", True), ("The answer is A and C.", True), ("\\boxed{AC}", True),
                     ("\\boxed{A}", False), ("\\boxed{A, C, D}", False)]:  # fmt: skip
        assert is_correct(extract_answer(text, "multi", multi.options), multi.answer, "multi") is ok, text


def test_wemath_testmini_json(tmp_path: Path) -> None:
    data = tmp_path / "We-Math" / "data"
    for d in ("2steps/image", "3steps/image"):
        (data / d).mkdir(parents=True)
    (data / "2steps/image/1-1.png").write_bytes(_png())
    (data / "3steps/image/7-2.png").write_bytes(_png("blue"))
    rows = [
        {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Length units",
         "question": "According to the diagram: OA = ( ) m, AB = ( ) m",
         "option": "A. 300, 400;B. 400, 300;C. 3000, 4000;D. 4000, 3000; E. No correct answer",
         "answer": "C", "image_path": "2steps/image/1-1.png", "key": "2steps_1", "question number": 1,
         "knowledge concept description": "..."},
        {"ID": "3steps_7", "split": "testmini", "knowledge concept": "Left-Right Position",
         "question": "The block to the right of H is ( ).", "option": "A. F;    B. D;    C. B;    D. I",
         "answer": "D", "image_path": "3steps/image/7-2.png", "key": "3steps_7"},
        {"ID": "2steps_9", "question": "Bad options", "option": "1) x 2) y", "answer": "A",
         "image_path": "2steps/image/1-1.png"},
    ]  # fmt: skip
    (data / "testmini.json").write_text(json.dumps(rows, indent=4))
    with pytest.raises(R1VError, match=r"testmini.json\[2\]: option '1\) x 2\) y' is not in We-Math's"):
        load_bench(f"wemath:{tmp_path / 'We-Math'}")
    bench = load_bench(f"wemath:{tmp_path / 'We-Math'}", skip_bad=True)
    a, b = bench.items
    assert a.options == ["300, 400", "400, 300", "3000, 4000", "4000, 3000", "No correct answer"]
    assert (a.answer, a.category, a.images) == ("C", "2steps", [data / "2steps/image/1-1.png"])
    assert (b.options, b.answer, b.category) == (["F", "D", "B", "I"], "D", "3steps")
    assert "C. 3000, 4000" in a.question


def _image_cell(color: str) -> dict[str, object]:
    return {"bytes": _png(color), "path": f"{color}.png"}


def test_hub_parquet_mathvista_and_mmmu_presets(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = pa.struct([("category", pa.string()), ("task", pa.string()), ("skills", pa.list_(pa.string()))])
    mv = tmp_path / "MathVista" / "data"
    mv.mkdir(parents=True)
    query = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\nQuestion: Which is longer?\nChoices:\n(A) AB\n(B) CD"  # noqa: E501
    table = pa.table(
        {
            "pid": ["1", "2"],
            "question": ["Which is longer?", "What is x?"],
            "image": ["images/1.jpg", "images/2.jpg"],
            "decoded_image": pa.array([_image_cell("red"), _image_cell("blue")], type=img),
            "choices": pa.array([["AB", "CD"], None], type=pa.list_(pa.string())),
            "unit": [None, None],
            "precision": pa.array([None, 2.0], type=pa.float64()),
            "answer": ["CD", "0.25"],
            "question_type": ["multi_choice", "free_form"],
            "answer_type": ["text", "float"],
            "metadata": pa.array(
                [
                    {
                        "category": "math-targeted-vqa",
                        "task": "geometry problem solving",
                        "skills": ["algebraic"],
                    },
                    {"category": "general-vqa", "task": "textbook question answering", "skills": []},
                ],
                type=meta,
            ),  # fmt: skip
            "query": [
                query,
                "Hint: Please answer the question requiring a floating-point number with two "
                "decimal places.\nQuestion: What is x?",
            ],  # fmt: skip
        }
    )
    pq.write_table(table, mv / "testmini-00000-of-00001-abc.parquet")
    bench = load_bench(f"mathvista:{tmp_path / 'MathVista'}")
    mc, free = bench.items
    assert (mc.kind, mc.answer, mc.category) == ("mc", "B", "geometry problem solving")
    assert mc.question.startswith("<image>\nHint: Please answer") and "Options:" not in mc.question
    assert (free.kind, free.answer, free.decimals) == ("numeric", "0.25", 2)

    art = tmp_path / "MMMU" / "Art"
    art.mkdir(parents=True)
    cols: dict[str, object] = {
        "id": ["validation_Art_1", "validation_Art_2"],
        "question": ["Which painting <image 1> matches <image 2>?", "What year is shown in <image 1>?"],
        "options": ["['<image 3>', 'The other one']", "[]"],
        "explanation": ["", ""],
        "img_type": ["['Paintings']", "['Photos']"],
        "answer": ["A", "['1889', '1890']"],
        "topic_difficulty": ["Easy", "Hard"],
        "question_type": ["multiple-choice", "open"],
        "subfield": ["Fine Arts", "Art History"],
    }
    for k in range(1, 8):
        cells = [_image_cell(c) if k <= n else None for c, n in (("red", 3), ("blue", 1))]
        cols[f"image_{k}"] = pa.array(cells, type=img)
    pq.write_table(pa.table(cols), art / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table(cols), art / "dev-00000-of-00001.parquet")  # another split: not loaded
    bench = load_bench(f"mmmu:{tmp_path / 'MMMU'}")
    assert bench.name == "mmmu" and len(bench.items) == 2
    mc, open_q = bench.items
    assert mc.question.startswith("Which painting <image> matches <image>?\nOptions:\nA. <image>\nB. The")
    assert (mc.kind, mc.answer, len(mc.images), mc.category) == ("mc", "A", 3, "Art")
    assert (open_q.kind, open_q.answer, open_q.accept) == ("numeric", "1889", ["1890"])
    pred = extract_answer("\\boxed{1890}", "numeric")
    assert is_correct(pred, open_q.answer, "numeric", accept=open_q.accept)
    with pytest.raises(R1VError, match="unknown parquet columns"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "odd.parquet")
        load_bench(str(tmp_path / "odd.parquet"))


def test_presets_errors_and_limits(tmp_path: Path) -> None:
    with pytest.raises(R1VError, match="unknown preset 'mathvsta'"):
        load_bench("mathvsta:/nowhere")
    with pytest.raises(R1VError, match="no LogicVista dataset.json here"):
        load_bench(f"logicvista:{tmp_path}")
    (tmp_path / "x.json").write_text(json.dumps({"a": {"question": "q", "answer": "1"}}))
    with pytest.raises(R1VError, match="without 'imagename'"):
        load_bench(str(tmp_path / "x.json"))
    f = tmp_path / "aime.jsonl"
    f.write_text("".join(json.dumps({"id": k, "problem": f"P{k}", "answer": str(k)}) + "\n" for k in "0123"))
    assert {i.kind for i in load_bench(f"aime:{f}").items} == {"numeric"}
    assert {i.kind for i in load_bench(str(f)).items} == {"math"}  # without the preset: MATH-style LaTeX


def test_stratified_limit_keeps_category_shares(tmp_path: Path) -> None:
    rows = [
        {"id": i, "question": "q", "answer": "1", "category": "big" if i < 80 else "small"}
        for i in range(100)
    ]
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sub = load_bench(str(f), limit=10, seed=2, stratify=True)
    assert Counter(i.category for i in sub.items) == {"big": 8, "small": 2}
    assert [i.id for i in sub.items] == sorted((i.id for i in sub.items), key=int)  # file order kept
    tiny = load_bench(str(f), limit=1, seed=2, stratify=True)
    assert len(tiny.items) == 1


def test_final_answer_after_the_last_think_close() -> None:
    assert final_answer("a </think> b </think>\n\n\\boxed{C}") == "\\boxed{C}"
    assert final_answer("still thinking \\boxed{B}") is None  # never closed: no answer, not the reasoning
    assert final_answer("plain", think_opened=False) == "plain"
    assert final_answer("<think>x", think_opened=False) is None


def test_real_shared_sets_through_presets(shared_data: Path) -> None:
    mv = load_bench(f"mathvision:{shared_data / 'math_vision_testmini'}")
    assert len(mv.items) == 304 and not mv.bad and Counter(i.kind for i in mv.items)["mc"] == 190
    # every image is placed once, where its tag stands or before the text
    assert all(i.question.count("<image>") == len(i.images) == 1 for i in mv.items)
    assert len(load_bench(f"math500:{shared_data / 'math500'}").items) == 500
    gsm = load_bench(f"gsm8k:{shared_data / 'gsm8k'}")
    assert len(gsm.items) == 1319 and gsm.items[0].answer == "18"
    for name in ("logicvista", "we_math_testmini"):
        if (shared_data / name).is_dir():  # not in every copy of the shared data
            preset = "logicvista" if name == "logicvista" else "wemath"
            bench = load_bench(f"{preset}:{shared_data / name}")
            assert len(bench.items) in (448, 1740) and not bench.bad
