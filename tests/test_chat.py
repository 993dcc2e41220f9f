"""`r1v-quant chat`: prompts equal the reference, llama.cpp and torch agree turn by turn, the terminal side
(streaming, <think> dimmed or collapsed, /commands, Ctrl-C, Ctrl-D) driven through a pseudo-terminal.

The tiny replica was trained on single-turn questions only: it names the colour of a shape in a first turn,
but its later turns are poor. Later turns are therefore checked against the torch reference forward given
the same conversation, not against the right colour.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from click.testing import CliRunner  # noqa: E402

from r1v_quant.cli.chat import ThinkingView, interactive  # noqa: E402
from r1v_quant.cli.main import main  # noqa: E402
from r1v_quant.data.synthdata import render_shape  # noqa: E402
from r1v_quant.exporters.gguf_llm import export_llm_gguf  # noqa: E402
from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf  # noqa: E402
from r1v_quant.model.artifact import find_gguf_pair  # noqa: E402
from r1v_quant.model.checkpoint import open_checkpoint  # noqa: E402
from r1v_quant.model.reference import R1VModel, build_inputs  # noqa: E402
from r1v_quant.model.tokenizer import R1VTokenizer  # noqa: E402
from r1v_quant.runtime.engines import LlamaCppLM, MmprojVision, TorchLM, TorchVision  # noqa: E402
from r1v_quant.runtime.llamacpp import LlamaCppRuntime  # noqa: E402
from r1v_quant.runtime.protocol import TokenText, conversation_ids  # noqa: E402
from r1v_quant.runtime.session import ChatSession  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp
COLOR_Q = "What color is the shape in the image?"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def exported(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-gguf")
    export_llm_gguf(tiny_dir, out / "r1v-tiny-F16.gguf", "F16", progress=False)
    export_mmproj_gguf(tiny_dir, out / "mmproj-r1v-tiny-F16.gguf", "F16")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # neutral file names: a terminal echoes what is typed, and the answers are checked for colour words
    out = tmp_path_factory.mktemp("chat-img")
    files = {"blue": ("blue", "circle"), "red": ("red", "square"), "wide": ("green", "circle")}
    paths = {}
    for i, (key, (color, shape)) in enumerate(files.items()):
        size = (600, 300) if key == "wide" else (448, 448)  # several tiles + thumbnail
        paths[key] = out / f"img{i}.png"
        render_shape(color, shape, size).save(paths[key])
    return paths


@pytest.fixture(scope="module")
def llama(exported: Path):
    gguf, mmproj = find_gguf_pair(exported)
    rt = LlamaCppRuntime(gguf, mmproj, n_ctx=4096, n_threads=2)
    lm = LlamaCppLM(rt)
    yield lm, MmprojVision(rt)
    lm.close()


@pytest.fixture(scope="module")
def torch_backend(tiny_dir: Path):
    net = R1VModel.from_checkpoint(open_checkpoint(tiny_dir))
    return TorchLM(net, R1VTokenizer.from_dir(tiny_dir), n_ctx=4096), TorchVision(net)


def _two_turns(images: dict[str, Path]) -> list[tuple[str, list[Path]]]:
    return [(COLOR_Q, [images["blue"]]), (f"Now this one: <image> {COLOR_Q}", [images["wide"]])]


# -- prompts and engines -----------------------------------------------------------------------------------
def test_conversation_ids_equal_the_runtime_prompt(llama, images: dict[str, Path]) -> None:
    lm, vision = llama
    msgs = [
        {"role": "user", "content": f"<image>\n{COLOR_Q}"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": f"and <image>? {COLOR_Q}"},
    ]
    pics = [images["blue"], images["wide"]]
    want_ids, want_rows = lm.rt.prompt(msgs, pics)
    embeds = [vision.encode(p) for p in pics]
    assert [e.tiles for e in embeds] == [1, 3]  # 600x300: 2x1 grid + thumbnail
    assert conversation_ids(lm.flavor, msgs, embeds, lm.tokenize) == want_ids
    np.testing.assert_array_equal(np.concatenate([e.rows for e in embeds]), want_rows)


def test_torch_prompt_equals_build_inputs(torch_backend, tiny_dir: Path, images: dict[str, Path]) -> None:
    lm, vision = torch_backend
    ids, pixels, _ = build_inputs(tiny_dir, lm.model.spec, COLOR_Q, [images["wide"]])
    emb = vision.encode(images["wide"])
    got = conversation_ids(
        lm.flavor, [{"role": "user", "content": f"<image>\n{COLOR_Q}"}], [emb], lm.tokenize
    )
    assert got == ids[0].tolist()
    want = lm.model.image_embeds(pixels).reshape(-1, lm.n_embd).numpy()
    np.testing.assert_allclose(emb.rows, want, rtol=0, atol=1e-6)

    small = ChatSession(TorchLM(lm.model, lm.tok, n_ctx=300), vision)
    with pytest.raises(R1VError, match="more than the context of 300"):
        small.ask(COLOR_Q, [images["wide"]])  # 3 tiles: 768 image tokens
    assert small.messages == [] and small.images == []


def test_llamacpp_and_torch_agree_over_two_turns(llama, torch_backend, images: dict[str, Path]) -> None:
    a = ChatSession(*llama, max_new_tokens=48)
    b = ChatSession(*torch_backend, max_new_tokens=48)
    for turn, (text, pics) in enumerate(_two_turns(images)):
        ra, rb = a.ask(text, pics), b.ask(text, pics)
        assert ra.tokens == rb.tokens and ra.stopped == rb.stopped
        if turn == 0:
            assert "blue" in ra.answer and ra.thinking and ra.timings["vision_s"] > 0
        else:  # the first image and its turn came from the cache
            assert ra.timings["n_reused"] > 256 and ra.prompt_tokens > 256 * 4
    assert [m["role"] for m in a.messages] == ["user", "assistant"] * 2
    for m in a.messages:  # reasoning never goes back into the history
        assert "</think>" not in m["content"] and "<think>" not in m["content"]
    assert a.messages[1]["content"] == "The answer is \\boxed{blue}."
    assert a.messages[2]["content"].startswith("Now this one: <image>")


def test_interrupted_turn_is_forgotten(llama, images: dict[str, Path]) -> None:
    session = ChatSession(*llama, max_new_tokens=48)
    seen: list[int] = []

    def stop_after_three(t: int) -> None:
        seen.append(t)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask(COLOR_Q, [images["blue"]], on_token=stop_after_three)
    assert session.messages == [] and session.images == [] and session.turns == 0
    again = session.ask(COLOR_Q, [images["blue"]])
    assert again.tokens[:3] == seen and "blue" in again.answer
    fresh = ChatSession(*llama, max_new_tokens=48).ask(COLOR_Q, [images["blue"]])
    assert fresh.tokens == again.tokens


def test_interactive_loop_commands_and_ctrl_c(llama, images: dict[str, Path]) -> None:
    """The loop itself: /image, Ctrl-C while the model writes (the turn is dropped), /reset, errors."""
    lm, vision = llama

    class InterruptFirstAnswer:  # the real model, with a Ctrl-C arriving during the first answer
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name: str):
            return getattr(lm, name)

        def generate(self, ids, rows, *, on_token, **kw):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 1:

                def on_token(t: int, inner=on_token) -> None:
                    inner(t)
                    raise KeyboardInterrupt

            return lm.generate(ids, rows, on_token=on_token, **kw)

    session = ChatSession(InterruptFirstAnswer(), vision, max_new_tokens=48)  # type: ignore[arg-type]
    lines = iter(["/help", f"/image {images['blue']}", COLOR_Q, COLOR_Q, "/image nope.png", "/reset",
                  "/bogus", "<image> <image> two tags", "/exit", "never read"])  # fmt: skip
    out: list[str] = []
    interactive(session, write=out.append, read=lambda _: next(lines))
    text = "".join(out)
    assert "/image PATH" in text and "[interrupted" in text
    assert text.count("(attached img0.png") == 1  # the image stayed attached after the interruption
    assert "The answer is \\boxed{blue}." in text
    assert "nope.png is not one" in text and "(new conversation)" in text and "unknown command /bogus" in text
    assert "error: the message has 2 <image> tag(s) but 0 image(s)" in text
    assert session.messages == []  # after /reset
    assert next(lines) == "never read"


# -- streaming pieces --------------------------------------------------------------------------------------
def test_thinking_view_dimmed_and_collapsed() -> None:
    pieces = ["Let me ", "look.\n", "</", "think", ">\n\n", "It is ", "blue."]
    out: list[str] = []
    view = ThinkingView(out.append, show=True)
    for p in pieces:
        view.feed(p)
    view.finish()
    text = "".join(out)
    assert "\x1b[2mLet me \x1b[0m" in text and "think>" not in text and "</" not in text
    assert ANSI.sub("", text) == "Let me look.\nIt is blue.\n"

    out.clear()
    view = ThinkingView(out.append, show=False)
    for p in pieces:
        view.feed(p)
    view.finish()
    assert "".join(out) == "[thinking: 5 tokens]\nIt is blue.\n"

    out.clear()  # the token budget ran out inside the reasoning; a '<' that never became </think>
    view = ThinkingView(out.append, show=False)
    for p in ["a < b", " so <"]:
        view.feed(p)
    view.finish()
    assert "".join(out) == "[thinking: 2 tokens, unfinished]\n"
    out.clear()
    view = ThinkingView(out.append, show=True)
    for p in ["a < b", " so <"]:
        view.feed(p)
    view.finish()
    assert ANSI.sub("", "".join(out)) == "a < b so <\n"


def test_token_text_gives_whole_characters(llama, torch_backend) -> None:
    text = "答案是 7, naïve ✓ </think>"
    for lm in (llama[0], torch_backend[0]):
        ids = lm.tokenize(text)
        stream = TokenText(lm.decode)
        pieces = [stream.push(t) for t in ids] + [stream.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        assert "" in pieces  # at least one character spanned several tokens


# -- ONNX vision encoder in place of the mmproj --------------------------------------------------------------
def test_onnx_vision_encoder_in_llamacpp_chat(
    llama, tiny_dir: Path, exported: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from r1v_quant.exporters.onnx_vision import export_onnx
    from r1v_quant.runtime.engines import OnnxVision

    export_onnx(tiny_dir, tmp_path / "onnx", verify=False)
    lm, mmproj = llama
    onnx = OnnxVision(tmp_path / "onnx", threads=2)
    a, b = onnx.encode(images["wide"]), mmproj.encode(images["wide"])
    assert a.tiles == b.tiles == 3 and a.rows.shape == b.rows.shape
    cos = (a.rows * b.rows).sum(1) / np.linalg.norm(a.rows, axis=1) / np.linalg.norm(b.rows, axis=1)
    assert cos.min() > 0.999  # fp32 ONNX against the F16 mmproj
    capped = OnnxVision(tmp_path / "onnx", threads=2, max_tiles=1).encode(images["wide"])
    assert capped.tiles == 1 and capped.rows.shape[0] == a.rows.shape[0] // 3  # --max-tiles reaches ONNX
    reply = ChatSession(lm, onnx, max_new_tokens=48).ask(COLOR_Q, [images["blue"]])
    assert "blue" in reply.answer

    gguf, _ = find_gguf_pair(exported)  # the language model alone: images only through ONNX
    r = _run("chat", "--gguf", str(gguf), "--vision-onnx", str(tmp_path / "onnx"), "--image",
             str(images["blue"]), "-p", COLOR_Q, "--json", "--threads", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "blue" in data["answer"] and data["vision"].startswith("ONNX") and data["backend"] == "llama.cpp"


# -- the command, without and with a terminal ----------------------------------------------------------------
def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r1v_quant.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _thinking_tokens(lm, tokens: list[int]) -> int:
    """How many tokens it took to reach the end of `</think>`."""
    return next(i + 1 for i in range(len(tokens)) if "</think>" in lm.decode(tokens[: i + 1]))


def test_json_one_shot_and_piped_stdin(llama, exported: Path, images: dict[str, Path]) -> None:
    r = _run("chat", "--gguf", str(exported), "--image", str(images["blue"]), "-p", COLOR_Q, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["answer"] == "The answer is \\boxed{blue}." and data["thinking"] and data["stopped"]
    assert data["n_tokens"] == len(data["tokens"]) > 0 and data["timings"]["n_gen"] == data["n_tokens"]
    assert data["flavor"] == "r1v" and data["vision"] == "mmproj (llama.cpp)"
    n_think = _thinking_tokens(llama[0], data["tokens"])

    # no terminal: lines are read from stdin, no prompt is printed, no colour codes
    r = _run("chat", "--gguf", str(exported), "--hide-thinking", "--threads", "2",
             stdin=f"/image {images['blue']}\n{COLOR_Q}\n/exit\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [f"[thinking: {n_think} tokens]", data["answer"]]
    assert "\x1b[" not in r.stdout and "> " not in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--gguf", "{g}", "--model", "{g}"), "either --gguf"),
        (("--gguf", "{g}", "--json"), "--json needs --prompt"),
        (("--gguf", "{g}/r1v-tiny-F16.gguf", "--image", "{img}", "-p", "hi"), "images need --mmproj"),
        (("--gguf", "{g}", "--image", "/nonexistent.png", "-p", "hi"), "image file not found"),
        (("--model", "{g}", "--mmproj", "{g}/mmproj-r1v-tiny-F16.gguf", "-p", "hi"), "--mmproj goes with"),
        (("--gguf", "{g}", "--max-tiles", "0", "-p", "hi"), "--max-tiles must be at least 1 (got 0)"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], needle: str, exported: Path, images) -> None:
    r = CliRunner().invoke(main, ["chat", *(a.format(g=exported, img=images["blue"]) for a in args)])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("backend", ["gguf", "model"])
def test_max_tiles_caps_the_tiling(
    backend: str, exported: Path, tiny_dir: Path, images: dict[str, Path]
) -> None:
    """--max-tiles reaches the mmproj and the torch tower tilers: the 2:1 picture is 2 x 1 tiles + thumbnail
    by default and one tile under --max-tiles 1 (256 prompt tokens per tile)."""
    base = ["chat", "--gguf", str(exported)] if backend == "gguf" else ["chat", "--model", str(tiny_dir)]
    prompt_tokens = {}
    for cap in ([], ["--max-tiles", "1"]):
        args = [*base, *cap, "--image", str(images["wide"]), "-p", COLOR_Q, "--max-new-tokens", "2", "--json"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        prompt_tokens[len(cap)] = json.loads(r.stdout)["prompt_tokens"]
    assert prompt_tokens[0] - prompt_tokens[2] == 2 * 256


def test_torch_chat_in_bfloat16(tiny_dir: Path, images: dict[str, Path]) -> None:
    """--model with --torch-dtype bfloat16 (how a 38B checkpoint would chat on a GPU), here on the CPU."""
    args = ["chat", "--model", str(tiny_dir), "--torch-device", "cpu", "--torch-dtype", "bfloat16"]
    r = CliRunner().invoke(main, [*args, "--image", str(images["blue"]), "-p", COLOR_Q, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["answer"] == "The answer is \\boxed{blue}." and data["vision"] == "vision tower (torch)"
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["chat", "--model", str(tiny_dir), "--torch-device", "cuda", "-p", "hi"])
        assert r.exit_code == 2 and "--torch-device cuda" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


class Terminal:
    """`r1v-quant chat` on a pseudo-terminal: what a person at a terminal types and sees."""

    started: list[Terminal] = []

    def __init__(self, *args: str):
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin, stdout and stderr are the terminal
            os.execve(sys.executable, [sys.executable, "-m", "r1v_quant.cli.main", *args], env)
        self.out = b""
        self.mark = 0
        self.exited = False
        Terminal.started.append(self)

    def read_until(self, needle: str, timeout: float = 120) -> str:
        """Everything new up to and including `needle` (colour codes kept)."""
        end = time.monotonic() + timeout
        want = needle.encode()
        while want not in self.out[self.mark :]:
            left = end - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {needle!r} in:\n{self.out[self.mark :].decode(errors='replace')}")
        stop = self.out.index(want, self.mark) + len(want)
        text, self.mark = self.out[self.mark : stop].decode(), stop
        return text

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.out += chunk
        return bool(chunk)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 180) -> tuple[int, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.1):
                    pass
                os.close(self.fd)
                self.exited = True
                return os.waitstatus_to_exitcode(status), self.out.decode(errors="replace")
        raise AssertionError("chat did not exit")


@pytest.fixture(autouse=True)
def _no_chat_left_running():
    """A test that failed half-way leaves its chat waiting for input: end it."""
    yield
    while Terminal.started:
        term = Terminal.started.pop()
        if not term.exited:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
            os.close(term.fd)


def test_terminal_one_shot_streams_dimmed_thinking(llama, exported: Path, images: dict[str, Path]) -> None:
    want = ChatSession(*llama).ask(COLOR_Q, [images["blue"]])
    assert "blue" in want.answer and want.thinking
    term = Terminal("chat", "--gguf", str(exported), "--image", str(images["blue"]), "-p", COLOR_Q)
    rc, out = term.wait()
    assert rc == 0, out
    out = out.replace("\r", "")
    reasoning, answer = out.split("\x1b[0m" + want.answer)
    assert re.fullmatch(r"(\x1b\[2m[^\x1b]+\x1b\[0m)+", reasoning + "\x1b[0m")  # streamed pieces, all dimmed
    assert len(re.findall(r"\x1b\[2m", reasoning)) > 3
    assert ANSI.sub("", reasoning).strip() == want.thinking and answer == "\n"


def test_terminal_two_turns_with_images(
    exported: Path, images: dict[str, Path], torch_backend, tmp_path: Path
) -> None:
    reference = ChatSession(*torch_backend, max_new_tokens=1024)
    want = [reference.ask(text, pics).answer for text, pics in _two_turns(images)]
    assert "blue" in want[0]

    term = Terminal("chat", "--gguf", str(exported), "--threads", "2")
    assert "/help for commands" in term.read_until("> ")
    for turn, ((text, pics), answer) in enumerate(zip(_two_turns(images), want, strict=True)):
        term.send(f"/image {pics[0]}\n")
        assert "(attached img" in term.read_until("> ")
        term.send(text + "\n")
        shown = ANSI.sub("", term.read_until("\n> ")).replace("\r", "")
        reply = shown.split(text, 1)[1].removesuffix("\n> ").strip()
        if turn == 0:
            assert reply.endswith(answer), shown  # the reasoning streamed, then the answer
        else:
            # The replica never learned second turns: its long answer there is a drift-prone ramble, so
            # F16 llama.cpp and float32 torch may part ways after many tokens. Token equality of two turns
            # is checked in-process (test_llamacpp_and_torch_agree_over_two_turns); here: it streamed.
            assert reply, shown
    term.send("/reset\n")
    term.read_until("(new conversation)")
    term.read_until("> ")
    term.send(f"/image {images['red']}\n")
    assert "(attached img1.png" in term.read_until("> ")
    term.send(COLOR_Q + "\n")
    assert "The answer is \\boxed{red}." in term.read_until("\n> ")
    term.send("/exit\n")  # (Ctrl-C at the prompt: test_interactive_loop_commands_and_ctrl_c)
    rc, out = term.wait()
    assert rc == 0 and "Traceback" not in out


def test_terminal_ctrl_d_and_ctrl_c_during_one_shot(exported: Path, images: dict[str, Path]) -> None:
    term = Terminal("chat", "--gguf", str(exported), "--threads", "2")
    term.read_until("> ")
    term.send("\x04")  # Ctrl-D
    rc, out = term.wait()
    assert rc == 0 and "Traceback" not in out

    # a Ctrl-C while the answer streams stops it: exit code 130, no traceback. The replica's answer is short,
    # so on a busy machine it can finish before the signal lands: then it must have finished cleanly, and
    # the scenario is tried again (what is asserted never depends on the timing)
    for _ in range(5):
        term = Terminal("chat", "--gguf", str(exported), "--threads", "1", "-p", "What is 12 + 30?")
        term.read_until("\x1b[2m")  # the first streamed piece
        os.kill(term.pid, signal.SIGINT)
        rc, out = term.wait()
        assert "Traceback" not in out
        if rc == 130:
            assert "interrupted" in out and "\\boxed" not in out  # the answer never came
            break
        assert rc == 0 and "\\boxed" in out  # finished before the Ctrl-C arrived
    else:
        pytest.fail("the answer finished before the Ctrl-C in every try")


def test_terminal_torch_backend_hides_thinking(llama, tiny_dir: Path, images: dict[str, Path]) -> None:
    want = ChatSession(*llama).ask(COLOR_Q, [images["blue"]])  # llama.cpp F16 = torch here (tested above)
    term = Terminal("chat", "--model", str(tiny_dir), "--image", str(images["blue"]), "-p", COLOR_Q,
                    "--hide-thinking", "--threads", "2")  # fmt: skip
    rc, out = term.wait()
    assert rc == 0, out
    out = ANSI.sub("", out)
    counts = [int(n) for n in re.findall(r"\[thinking: (\d+) tokens\]", out)]  # redrawn in place
    n_think = _thinking_tokens(llama[0], want.tokens)
    assert counts[-1] == n_think and set(counts) == set(range(1, n_think + 1))
    assert out.replace("\r", "").endswith(f"tokens]\n{want.answer}\n") and "blue" in want.answer
    assert want.thinking not in out


def test_engines_score_the_same_prompt_alike(llama, torch_backend, images: dict[str, Path]) -> None:
    """The runtime protocol's two language models: one prompt gives the same ids, `logits` at chosen
    positions equal the full forward's rows, and the GGUF (F16) scores those rows as torch does."""
    from r1v_quant.runtime.protocol import prompt_inputs

    (lm_t, vis_t), (lm_l, vis_l) = torch_backend, llama
    msgs = [{"role": "user", "content": COLOR_Q}]
    ids_t, rows_t = prompt_inputs(lm_t, vis_t, msgs, [images["blue"]])
    ids_l, rows_l = prompt_inputs(lm_l, vis_l, msgs, [images["blue"]])
    assert ids_t == ids_l and rows_t.shape == rows_l.shape
    pos = np.zeros(len(ids_t), dtype=bool)
    pos[-6:] = True
    a = lm_t.logits(ids_t, rows_t, pos)
    full = lm_t.logits(ids_t, rows_t)
    assert a.shape == (6, full.shape[1])
    np.testing.assert_allclose(a, full[pos], rtol=0, atol=1e-4)
    b = lm_l.logits(ids_l, rows_l, pos)
    assert b.shape == a.shape
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.99, cos
    with pytest.raises(R1VError, match="1 image"):
        prompt_inputs(lm_t, vis_t, [{"role": "user", "content": "<image><image> hi"}], [images["blue"]])
