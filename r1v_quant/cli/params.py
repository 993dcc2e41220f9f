"""Click parameters shared by the commands: MODEL as a local path or a Hugging Face repo id (`REPO@REV`),
resolved to a local folder before the command runs. CLI layer only: library code takes Paths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from r1v_quant.util.errors import R1VError
from r1v_quant.util.hub import resolve_model

F = TypeVar("F", bound=Callable[..., Any])

REVISION_HELP = "Hub branch, tag or commit (when MODEL is a Hugging Face repo id; or write REPO@REV)."


def _resolving(fn: F, param: str, weights: bool) -> F:
    """Wrap a click callback: `param` (a path or repo id) becomes a local Path; `revision` is consumed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        revision = kwargs.pop("revision", None)
        progress = not kwargs.get("as_json", False)
        if kwargs.get(param) is not None:
            kwargs[param] = resolve_model(kwargs[param], revision, weights=weights, progress=progress)
        elif revision is not None:
            raise R1VError(f"--revision {revision}: no model repo id given")
        return fn(*args, **kwargs)

    return click.option("--revision", default=None, metavar="REV", help=REVISION_HELP)(wrapper)  # type: ignore[return-value]


def model_argument(name: str = "model", *, weights: bool = True) -> Callable[[F], F]:
    """Click decorator: argument MODEL (local path or Hub repo id, `REPO@REV` allowed) plus `--revision`.

    Use it in place of `@click.argument("model", ...)`; the callback's `name` parameter receives the
    resolved local path and `revision` is consumed here. `weights=False` for commands that need only
    config, index and tokenizer (inspect). A `--json` run (parameter `as_json`) downloads without bars.
    """

    def decorate(fn: F) -> F:
        return click.argument(name, metavar=name.upper())(_resolving(fn, name, weights))  # type: ignore[return-value]

    return decorate


def model_option(*decls: str, weights: bool = True, help: str | None = None) -> Callable[[F], F]:
    """Like `model_argument`, for an optional `--model`-style option (default `--model`, parameter `model`).

    `@model_option("--model", "-m")` adds the option and `--revision`; when the option is given, the
    callback receives a resolved local Path, else None.
    """
    decls = decls or ("--model",)
    param = max(decls, key=len).lstrip("-").replace("-", "_")

    def decorate(fn: F) -> F:
        option = click.option(
            *decls, default=None, metavar="MODEL", help=help or "Checkpoint directory or Hub repo id."
        )
        return option(_resolving(fn, param, weights))  # type: ignore[return-value]

    return decorate
