"""`r1v-quant demo`: the whole pipeline on the built-in tiny replica, one step after another.

Each step writes into the demo folder and is skipped when its output is already there, so a re-run only
does what is missing. Steps are added here as the pipeline grows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _step(name: str, out: Path, fn: Callable[[], Any], results: dict[str, Any]) -> Any:
    t0 = time.perf_counter()
    click.secho(f"==> {name}", bold=True, err=True)
    value = fn()
    results[name] = {"seconds": round(time.perf_counter() - t0, 1)}
    return value


def run_demo(out: Path, *, seed: int = 0) -> dict[str, Any]:
    from r1v_quant.generate import answer
    from r1v_quant.inspect_model import format_report, inspect_model
    from r1v_quant.synthdata import render_shape
    from r1v_quant.tiny import TinyOptions, build_tiny

    out.mkdir(parents=True, exist_ok=True)
    model = out / "r1v-tiny"
    results: dict[str, Any] = {}

    def tiny() -> None:
        if (model / "model.safetensors.index.json").is_file():
            click.echo(f"    reusing {model}", err=True)
            return
        from tqdm import tqdm

        with tqdm(total=TinyOptions().steps, desc="    training", unit="step") as bar:
            build_tiny(
                model,
                TinyOptions(seed=seed),
                lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
            )

    _step("build tiny replica", out, tiny, results)
    report = _step("inspect", out, lambda: inspect_model(model), results)
    click.echo(format_report(report))
    image = out / "question.png"
    render_shape("blue", "circle").save(image)
    question = "What color is the shape in the image?"

    def ask() -> dict[str, Any]:
        click.echo(f"    Q: <image> {question}\n    A: ", nl=False)
        return answer(model, question, [image], max_new_tokens=48, stream=lambda s: click.echo(s, nl=False))

    reply = _step("ask the replica about an image (torch reference)", out, ask, results)
    results["ask the replica about an image (torch reference)"].update(
        answer=reply["answer"], image_tiles=reply["image_tiles"], prompt_tokens=reply["prompt_tokens"]
    )
    (out / "demo_summary.json").write_text(json.dumps(results, indent=2) + "\n")
    click.echo("\nstep                                                   seconds")
    for name, r in results.items():
        click.echo(f"{name:<55}{r['seconds']:>7}")
    return results
