"""The engine users deploy: the GGUF's chat template under llama-cpp-python's stock `MTMDChatHandler` for
every flavour, and `eval bench --cand openai:URL` against llama-cpp-python's own OpenAI-compatible server
(its `server` extra) on loopback, answering exactly as the in-process llama.cpp backend does."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from r1v_quant.cli.main import main  # noqa: E402
from r1v_quant.data.synthdata import render_shape  # noqa: E402
from r1v_quant.model.prompts import CHAT_FORMATS, MTMD_MARKER, build_prompt, render_chat_template  # noqa: E402

pytestmark = pytest.mark.llamacpp


def _export(model: Path, out: Path) -> Path:
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf

    out.mkdir(parents=True)
    export_llm_gguf(model, out / f"{model.name}-F16.gguf", "F16", progress=False)
    export_mmproj_gguf(model, out / f"mmproj-{model.name}-F16.gguf", "F16")
    return out


@pytest.fixture(scope="module")
def f16_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_dir, tmp_path_factory.mktemp("srv") / "gguf")


def _picture(color: str, size: tuple[int, int] = (448, 448)) -> bytes:
    """448 x 448: one tile by InternVL's rule and by llama.cpp's, so both engines see the same pixels."""
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse((60, 60, 380, 380), fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("flavor", ["r1v", "r1v2", "r1v3"])
def test_stock_mtmd_handler_takes_typed_content(
    flavor: str, tiny_dir: Path, f16_dir: Path, tmp_path: Path
) -> None:
    """llama-cpp-python's MTMDChatHandler renders the GGUF's template with OpenAI content lists: no
    TypeError, the image where it stands, the same prompt as r1v-quant's runtime builds."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from r1v_quant.runtime.llamacpp import LlamaCppRuntime

    if flavor == "r1v":
        gguf_dir = f16_dir
    else:  # an untrained replica of the flavour is enough for its template and vocabulary
        from r1v_quant.replica.build import TinyOptions, build_tiny

        model = tmp_path / f"{flavor}-tiny"
        build_tiny(model, TinyOptions(flavor=flavor, steps=0, seed=2))
        gguf_dir = _export(model, tmp_path / "gguf")
    llm_file = next(p for p in gguf_dir.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(gguf_dir.glob("mmproj*.gguf"))
    png = _picture("red")
    typed = [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the shape?\n"},
        {"type": "image_url", "image_url": {"url": _url(png)}},
        {"type": "text", "text": "\nAnswer in one word."},
    ]}]  # fmt: skip
    as_text = "What colour is the shape?\n<image>\nAnswer in one word."
    template = CHAT_FORMATS[flavor].gguf_chat_template
    # the handler's own message conversion (image parts -> the media marker) under the GGUF's template
    converted = MTMDChatHandler._get_template_messages(
        MTMDChatHandler,  # type: ignore[arg-type]
        typed,  # type: ignore[arg-type]
        MTMD_MARKER,
    )
    want = build_prompt(flavor, [{"role": "user", "content": as_text}]).replace("<image>", MTMD_MARKER)
    assert render_chat_template(template, converted) == want

    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = llama_cpp.Llama(
        model_path=str(llm_file), chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False
    )
    rt = LlamaCppRuntime(llm_file, mmproj, n_ctx=2048, n_threads=2)
    try:
        assert llm.metadata["tokenizer.chat_template"] == template
        for messages in (typed, [{"role": "user", "content": "What is 2 + 3?"}]):  # typed and plain content
            reply = llm.create_chat_completion(
                messages=messages, max_tokens=4, temperature=0.0, repeat_penalty=1.0
            )
            assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        ids, embeds = rt.prompt([{"role": "user", "content": as_text}], [png])
        reply = llm.create_chat_completion(messages=typed, max_tokens=1, temperature=0.0)
        assert reply["usage"]["prompt_tokens"] == len(ids)  # <img> + 256 image rows + </img>, as ours
    finally:
        rt.close()
        llm.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(f16_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on loopback, serving the replica's GGUF + mmproj."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("pydantic_settings")
    port = _free_port()
    llm_file = next(p for p in f16_dir.glob("*.gguf") if "mmproj" not in p.name)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(llm_file), "--clip_model_path",
           str(next(f16_dir.glob("mmproj*.gguf"))), "--chat_format", "mtmd", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "4096", "--n_threads", "2",
           "--model_alias", "r1v-tiny"]  # fmt: skip
    with open(log, "w") as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench(tmp: Path) -> Path:
    """Arithmetic and colour questions, generic JSONL. The pictures and the wording are those the replica's
    build verifies greedily (its probe pictures): off them a trained model is unsure, and a near-tie flips
    between two llama.cpp call paths (in-process and server batch the prompt differently) on some CPUs."""
    (tmp / "img").mkdir()
    rows = []
    for k, color in enumerate(["red", "blue", "green"]):
        render_shape(color, "circle").save(tmp / "img" / f"{k}.png")
        rows.append({"id": f"i{k}", "question": "What color is the shape in the image?", "answer": color,
                     "image": f"img/{k}.png", "category": "image"})  # fmt: skip
    for k, (a, b) in enumerate([(2, 3), (7, 5), (12, 4)]):
        rows.append({"id": f"t{k}", "question": f"What is {a} + {b}?", "answer": str(a + b),
                     "category": "sum"})  # fmt: skip
    f = tmp / "bench.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_server_answers_as_the_in_process_backend(
    tiny_dir: Path, f16_dir: Path, server: str, tmp_path: Path
) -> None:
    """Same GGUF, same items, greedy: the server's answers (3 requests in flight) equal the in-process
    llama.cpp backend's, answer by answer, so the accuracy is the same."""
    responses = tmp_path / "responses.jsonl"
    res = CliRunner().invoke(
        main,
        [
            "eval",
            "bench",
            "--ref",
            str(tiny_dir),
            "--cand",
            str(f16_dir),
            "--cand",
            f"openai:{server}#r1v-tiny",
            "--bench",
            str(_bench(tmp_path)),
            "--greedy",
            "--max-tokens",
            "24",
            "--parallel",
            "3",
            "--threads",
            "2",
            "--max-drop",
            "100",
            "--save-responses",
            str(responses),
            "--json",
        ],  # fmt: skip
    )
    assert res.exit_code in (0, 1), res.output
    rep = json.loads(res.output)
    local, served = rep["candidates"]
    # named by the served model; made unique when the reference folder has the same name ("r1v-tiny-2")
    name = served["artifact"]
    assert served["backend"] == "openai" and served["path"] == server and name.startswith("r1v-tiny")
    assert (served["acc"], served["truncated"], served["no_answer"]) == (
        local["acc"], local["truncated"], local["no_answer"]
    )  # fmt: skip
    by: dict[str, dict[str, dict]] = {}
    for line in responses.read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r["artifact"], {})[r["id"]] = r
    assert set(by[name]) == set(by[local["artifact"]]) and len(by[name]) == 6
    for item, mine in by[local["artifact"]].items():
        theirs = by[name][item]
        assert (theirs["pred"], theirs["correct"], theirs["stopped"]) == (
            mine["pred"], mine["correct"], mine["stopped"]
        ), item  # fmt: skip
        # the same tokens; the server drops bytes that are not UTF-8 where r1v-quant writes U+FFFD
        a, b = mine["response"].replace("\ufffd", ""), theirs["response"]
        assert (a == b) if mine["stopped"] else (b.startswith(a) or a.startswith(b)), (item, a, b)


def test_dead_server_is_one_error_line(tiny_dir: Path, tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    res = CliRunner().invoke(
        main,
        [
            "eval",
            "bench",
            "--ref",
            str(tiny_dir),
            "--cand",
            f"openai:http://127.0.0.1:{port}/v1",
            "--bench",
            str(_bench(tmp_path)),
            "--greedy",
            "--max-tokens",
            "8",
        ],  # fmt: skip
    )
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith(("bench ", "preflight"))]
    assert len(lines) == 1 and "cannot reach the server" in lines[0] and f":{port}" in lines[0], res.output
    res = CliRunner().invoke(main, ["eval", "bench", "--ref", str(tiny_dir), "--cand", "openai:nonsense",
                                    "--bench", "builtin:tiny"])  # fmt: skip
    assert res.exit_code == 2 and "expected openai:http://HOST:PORT/v1" in res.output
