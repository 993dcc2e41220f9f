"""`r1v-quant profile` and `r1v-quant plan`: thin click wrappers over profiler.py and planner.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.cli.params import model_argument, model_option
from r1v_quant.util.errors import R1VError


@click.command("profile")
@model_argument("path")
@click.option(
    "--backend",
    type=click.Choice(["torch", "llama.cpp"]),
    default=None,
    help="Default: llama.cpp for GGUF, torch for checkpoints (16-bit or AWQ).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: the runtime's).")
@click.option(
    "--ctx",
    type=int,
    default=None,
    help="Context (llama.cpp n_ctx; default prompt + generated, rounded up to 256).",
)
@click.option(
    "--prompt-tokens",
    type=int,
    default=512,
    show_default=True,
    help="Prompt length in tokens, template and image tokens included.",
)
@click.option("--gen-tokens", type=int, default=32, show_default=True, help="Tokens decoded per run.")
@click.option(
    "--image",
    type=click.Path(path_type=Path),
    default=None,
    help="Image to encode (default: a generated 448x448 picture, one tile).",
)
@click.option("--no-image", is_flag=True, help="Text only: no vision encoding.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Runs, each in a fresh process.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="torch compute dtype (default fp32 on CPU, bf16 on CUDA).",
)
@click.option(
    "--vision",
    default=None,
    metavar="onnx:DIR",
    help="Encode images with an ONNX export (`r1v-quant onnx`) instead of torch / the mmproj.",
)
@click.option("--mmproj", type=click.Path(path_type=Path), default=None, help="mmproj GGUF (llama.cpp).")
@click.option("--no-roofline", is_flag=True, help="Skip the bandwidth and matmul measurements.")
@click.option("--json", "as_json", is_flag=True)
def profile_command(
    path: Path, backend: str | None, device: str, threads: int | None, ctx: int | None, prompt_tokens: int,
    gen_tokens: int, image: Path | None, no_image: bool, repeat: int, dtype: str | None, vision: str | None,
    mmproj: Path | None, no_roofline: bool, as_json: bool,
) -> None:  # fmt: skip
    """Measure load time, time to first token, prefill/decode speed, vision ms per tile and peak memory
    of the model at PATH (checkpoint, AWQ checkpoint, GGUF file or GGUF directory). A checkpoint may be a
    Hugging Face repo id (REPO, REPO@REV or --revision); a GGUF is a local file or folder."""
    from r1v_quant.profiling.profiler import format_profile, profile

    if image is not None and no_image:
        raise R1VError("--image and --no-image exclude each other")
    result = profile(
        path, backend=backend, device=device, threads=threads, ctx=ctx, prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens, image=image, no_image=no_image, repeat=repeat, dtype=dtype, vision=vision,
        mmproj=mmproj, roofline=not no_roofline, progress=not as_json,
    )  # fmt: skip
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_profile(result))


@click.command("plan")
@model_option(
    weights=False,
    help="Checkpoint or AWQ checkpoint (folder or Hugging Face repo id: only its config and index are "
    "fetched), GGUF file or GGUF directory.",
)
@click.option(
    "--preset",
    type=click.Choice(["r1v-38b", "r1v2-38b", "r1v3-38b"]),
    default=None,
    help="A release by its published dimensions.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    required=True,
    metavar="gpu:SIZE|cpu:SIZE",
    help="Repeatable, e.g. --device gpu:30GB --device cpu:32GB (GB = GiB, as memory is sold).",
)
@click.option(
    "--ctx",
    type=int,
    default=32768,
    show_default=True,
    help="Tokens per sequence the KV cache must hold (prompt, image tokens and the reasoning output).",
)
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences decoded together.")
@click.option(
    "--prefill",
    type=int,
    default=None,
    help="Tokens per forward pass (default: llama.cpp 512, vLLM 2048, torch the context).",
)
@click.option("--tiles", type=int, default=None, help="Tiles per image (default: the model's maximum).")
@click.option("--images", type=int, default=1, show_default=True, help="Images per prompt (0: text only).")
@click.option(
    "--max-tiles",
    type=int,
    default=None,
    metavar="N",
    help="Tile cap as in chat/eval: one image = N tiles + a thumbnail (sets --tiles when not given).",
)
@click.option(
    "--cpu-gflops",
    type=float,
    default=None,
    help="Your CPU's effective GFLOP/s for the time-to-first-token estimate (default: measured figures of "
    "a 2-thread AVX-512 CPU).",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "torch", "llama.cpp", "vllm", "gpu-engine"]),
    default="auto",
    show_default=True,
    help="gpu-engine is the earlier name of vllm.",
)
@click.option(
    "--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="torch runtime dtype."
)
@click.option(
    "--kv-type",
    type=click.Choice(["f32", "f16", "bf16", "fp8", "q8_0", "q4_0"]),
    default=None,
    help="Only this KV-cache type (default: compare them).",
)
@click.option(
    "--reserve",
    default=None,
    help="Memory kept free for the OS and other programs (default: 2.5GB on CPU devices, 0 on GPUs).",
)
@click.option("--host-ram", default=None, help="Host RAM beside a GPU (checks what runs on the host).")
@click.option("--top", type=int, default=5, show_default=True, help="Recommendations per device.")
@click.option("--markdown", is_flag=True, help="Only the first recommendation per device, as a table.")
@click.option(
    "--emit",
    type=click.Choice(["vllm", "llama-server"]),
    default=None,
    help="Print the command line that runs the best fitting configuration of this engine (one --device).",
)
@click.option(
    "--mmproj",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --model FILE.gguf: the vision tower's mmproj GGUF.",
)
@click.option("--serve-model", default=None, help="Model path or repo id to write into the --emit command.")
@click.option("--serve-mmproj", default=None, help="mmproj path to write into a llama-server command.")
@click.option("--json", "as_json", is_flag=True)
def plan_command(
    model: Path | None, preset: str | None, devices: tuple[str, ...], ctx: int, batch: int,
    prefill: int | None, tiles: int | None, max_tiles: int | None, cpu_gflops: float | None, images: int,
    runtime: str, dtype: str | None, kv_type: str | None, reserve: str | None, host_ram: str | None, top: int,
    markdown: bool, emit: str | None, mmproj: Path | None, serve_model: str | None, serve_mmproj: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Memory breakdown, verdict, largest context and ranked configurations for each device; with
    --emit, the `vllm serve` or `llama-server` command line for the best configuration that fits."""
    from r1v_quant.plan.planner import format_plan, markdown_table, plan
    from r1v_quant.plan.serve_commands import add_commands
    from r1v_quant.plan.serve_commands import emit as emit_command

    if emit and len(devices) != 1:
        raise R1VError("--emit writes one command: give exactly one --device")
    result = plan(
        model=model, preset=preset, devices=list(devices), ctx=ctx, batch=batch, prefill=prefill,
        tiles=tiles, runtime=runtime, dtype=dtype, kv_type=kv_type, reserve=reserve, host_ram=host_ram,
        top=top, images=images, mmproj=mmproj, max_tiles=max_tiles, cpu_gflops=cpu_gflops,
    )  # fmt: skip
    add_commands(result)
    if emit:
        result["emit"] = emit_command(result, emit, model=serve_model, mmproj=serve_mmproj)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif emit:
        click.echo(result["emit"]["command"])
    elif markdown:
        click.echo(markdown_table(result))
    else:
        click.echo(format_plan(result))
