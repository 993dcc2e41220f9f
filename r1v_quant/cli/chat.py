"""`r1v-quant chat`: one-shot or interactive multi-turn image chat, streamed as the tokens come.

The conversation is `r1v_quant.runtime.session.ChatSession` over the runtime protocol's engines
(`r1v_quant.runtime.engines`); this module is the terminal side: the `<think>` section shown dimmed or
collapsed to one line, the interactive commands, Ctrl-C / Ctrl-D.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from r1v_quant.cli.params import model_option
from r1v_quant.model.prompts import THINK_END
from r1v_quant.runtime.protocol import TokenText
from r1v_quant.util.errors import R1VError

Write = Callable[[str], None]

HELP = """\
Type a message and press Enter. Commands:
  /image PATH   attach an image to your next message (repeat for several; put <image> in the
                message to place them, otherwise they go before its text)
  /reset        start a new conversation (attached images are dropped)
  /help         this text
  /exit         quit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while the model writes stops that answer; the turn is forgotten."""


class ThinkingView:
    """Writes a streamed reply: the reasoning dimmed (`show`) or as one `[thinking: N tokens]` line, then
    the answer. `</think>` may arrive split over several pieces, so a possible start of it is held back."""

    def __init__(self, write: Write, *, show: bool = True, thinking: bool = True, live: bool = False):
        self.write, self.show, self.live = write, show, live
        self.thinking = thinking  # the prompt opened <think>: the reply starts inside the reasoning
        self.held = ""
        self.think_tokens = 0
        self.answer_started = False
        self.at_line_start = True

    def feed(self, text: str) -> None:
        """One generated token's text ('' while a character is incomplete)."""
        if not self.thinking:
            self._answer(text)
            return
        self.think_tokens += 1
        self.held += text
        end = self.held.find(THINK_END)
        if end >= 0:
            rest = self.held[end + len(THINK_END) :]
            self._reasoning(self.held[:end])
            self.held = ""
            self._close_reasoning(finished=True)
            self._answer(rest)
            return
        keep = next((k for k in range(len(THINK_END) - 1, 0, -1) if self.held.endswith(THINK_END[:k])), 0)
        self._reasoning(self.held[: len(self.held) - keep])
        self.held = self.held[len(self.held) - keep :]

    def finish(self) -> None:
        """End of the reply (or an interruption): flush, close the reasoning if it never finished."""
        if self.thinking:
            self._reasoning(self.held)
            self.held = ""
            self._close_reasoning(finished=False)
        if not self.at_line_start:
            self.write("\n")
            self.at_line_start = True

    def _out(self, text: str, **style: Any) -> None:
        if text:
            self.write(click.style(text, **style) if style else text)
            self.at_line_start = text.endswith("\n")

    def _reasoning(self, text: str) -> None:
        if self.show:
            self._out(text, dim=True)
        elif self.live:  # redraw the one-line counter in place
            self.write(f"\r[thinking: {self.think_tokens} tokens]")
            self.at_line_start = False

    def _close_reasoning(self, *, finished: bool) -> None:
        self.thinking = False
        if self.show:
            if not self.at_line_start:
                self._out("\n")
            return
        note = "" if finished else ", unfinished"
        self.write(("\r" if self.live else "") + f"[thinking: {self.think_tokens} tokens{note}]\n")
        self.at_line_start = True

    def _answer(self, text: str) -> None:
        if not self.answer_started:
            text = text.lstrip()  # the blank line after </think>
            self.answer_started = bool(text)
        self._out(text)


def _echo(text: str) -> None:
    click.echo(text, nl=False)  # strips the dim style when stdout is not a terminal
    sys.stdout.flush()


def stream_reply(session: Any, text: str, images: Sequence[Any], *, show_thinking: bool, write: Write) -> Any:
    """Ask `session` and stream the reply through a ThinkingView; the view is closed even on Ctrl-C."""
    view = ThinkingView(write, show=show_thinking, thinking=session.think, live=sys.stdout.isatty())
    pieces = TokenText(session.lm.decode)
    try:
        reply = session.ask(text, images, on_token=lambda t: view.feed(pieces.push(t)))
        rest = pieces.flush()
        if rest:
            view.feed(rest)
    finally:
        view.finish()
    return reply


def read_line(prompt: str) -> str:
    """One line from the user; EOFError at the end of input. No prompt when stdin is not a terminal."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def interactive(
    session: Any,
    *,
    images: Sequence[Path] = (),
    show_thinking: bool = True,
    write: Write = _echo,
    read: Callable[[str], str] = read_line,
) -> None:
    """The chat loop. Returns on /exit, Ctrl-D or Ctrl-C at the prompt."""
    pending = list(images)
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip().strip("'\"")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/help":
                write(HELP + "\n")
            elif cmd == "/reset":
                session.reset()
                pending.clear()
                write("(new conversation)\n")
            elif cmd == "/image":
                path = Path(arg).expanduser()
                if not arg or not path.is_file():
                    write(f"error: /image needs an image file{f': {arg} is not one' if arg else ''}\n")
                    continue
                pending.append(path)
                write(f"(attached {path.name}: {len(pending)} image(s) go with your next message)\n")
            else:
                write(f"unknown command {cmd} (/help lists them)\n")
            continue
        try:
            stream_reply(session, line, pending, show_thinking=show_thinking, write=write)
        except KeyboardInterrupt:
            write("[interrupted: this turn is forgotten]\n")
            continue  # attached images stay for the next try
        except R1VError as e:
            write(f"error: {e}\n")
        pending.clear()


@click.command("chat")
@click.option(
    "--gguf", type=click.Path(path_type=Path), help="Language-model GGUF, or a folder with it + mmproj."
)
@click.option("--mmproj", type=click.Path(path_type=Path), help="mmproj GGUF (vision tower + mlp1).")
@model_option(help="16-bit or AWQ checkpoint (folder, or Hugging Face repo id REPO[@REV]): torch backend.")
@click.option("--vision-onnx", type=click.Path(path_type=Path), help="`r1v-quant onnx` export for images.")
@click.option(
    "--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image(s), first turn."
)
@click.option("--prompt", "-p", default=None, help="Ask this once and exit (otherwise: interactive).")
@click.option("--system", default=None, help="System message.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option(
    "--torch-device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda[:N]",
    help="With --model: where the torch backend runs (auto: CUDA when present).",
)
@click.option(
    "--torch-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="With --model: compute dtype (auto: float32 on CPU, bfloat16 on CUDA).",
)
@click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context length in tokens.")
@click.option(
    "--max-tiles",
    type=int,
    default=None,
    metavar="N",
    help="Tile cap of the dynamic image tiling (default: the model's, 12 for R1V; a thumbnail is added when "
    "the grid has more than one tile). On a CPU each InternViT-6B tile costs seconds: 1-4 answer sooner.",
)
@click.option("--max-new-tokens", type=int, default=1024, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--show-thinking/--hide-thinking", default=True, show_default=True,
              help="Reasoning dimmed, or collapsed to one '[thinking: N tokens]' line.")  # fmt: skip
@click.option(
    "--json", "as_json", is_flag=True, help="One-shot only: print answer, thinking, tokens, timings."
)
def chat_command(
    gguf: Path | None,
    mmproj: Path | None,
    model: Path | None,
    vision_onnx: Path | None,
    images: tuple[Path, ...],
    prompt: str | None,
    system: str | None,
    threads: int | None,
    torch_device: str,
    torch_dtype: str,
    n_ctx: int,
    max_tiles: int | None,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    show_thinking: bool,
    as_json: bool,
) -> None:
    """Chat with a model about images: llama.cpp (--gguf [--mmproj]) or torch (--model).

    With --prompt: one answer, then exit. Otherwise interactive: /image PATH attaches an image to the next
    message, /reset, /help, /exit (or Ctrl-D)."""
    from r1v_quant.plan.image_cost import check_max_tiles
    from r1v_quant.runtime.engines import open_engines
    from r1v_quant.runtime.options import RuntimeOptions
    from r1v_quant.runtime.session import ChatSession

    if as_json and prompt is None:
        raise R1VError("--json needs --prompt (one-shot mode)")
    if prompt is not None and not prompt.strip():
        raise R1VError("--prompt is empty")
    if max_new_tokens < 1 or n_ctx < 16 or temperature < 0:
        raise R1VError("--max-new-tokens must be >= 1, --ctx >= 16 and --temperature >= 0")
    check_max_tiles(max_tiles)
    for image in images:
        if not image.is_file():
            raise R1VError(f"image file not found: {image}")
    options = RuntimeOptions(
        n_threads=threads, torch_device=torch_device, torch_dtype=torch_dtype, max_tiles=max_tiles
    )
    lm, vision = open_engines(
        gguf=gguf, mmproj=mmproj, model=model, vision_onnx=vision_onnx, options=options, n_ctx=n_ctx
    )
    session = ChatSession(
        lm, vision, system=system, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    try:
        if prompt is not None:
            if as_json:
                reply = session.ask(prompt, images)
                info = {"backend": lm.name, "vision": vision and vision.name, "flavor": lm.flavor}
                click.echo(json.dumps({**reply.to_json(), **info}, indent=2))
            else:
                stream_reply(session, prompt, images, show_thinking=show_thinking, write=_echo)
            return
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            seen = f", images by {vision.name}" if vision else ", text only"
            click.echo(f"r1v-quant chat: {lm.name} ({lm.flavor}{seen}). /help for commands, Ctrl-D to quit.")
        interactive(session, images=images, show_thinking=show_thinking)
    finally:
        session.close()
