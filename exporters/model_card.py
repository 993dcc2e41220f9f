"""Model cards: the README.md every exported folder (AWQ checkpoint, GGUF folder, ONNX folder) carries.

A card has YAML front matter the Hugging Face Hub reads (`base_model`, `license` copied from the source,
`library_name`, `pipeline_tag`, `tags`), then how the artifact was made (command, versions, calibration-set
hash, quantization settings), how to run it, and a quality section. The quality section sits between two
HTML comments so `update_card_quality` (for `r1v-quant check`) can replace it later without re-rendering
the rest, and a re-render keeps an earlier measured table.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import yaml

from r1v_quant import __version__
from r1v_quant.util.atomic import write_text_atomic
from r1v_quant.util.errors import R1VError, os_error
from r1v_quant.util.hub import hub_source, is_repo_id, model_name

CARD_NAME = "README.md"
GGUF_MANIFEST = "gguf_export.json"
GGUF_FOLDER_FORMAT = "r1v-quant/gguf-folder"
# options that change how a run goes, not what it makes: left out of the recorded command line, so a
# resumed run's card is the same bytes as an uninterrupted one's
NOT_RECORDED = ("as_json", "resume")
AWQ_REPORT = "quant_report.json"
QUALITY_BEGIN = "<!-- r1v-quant:quality -->"
QUALITY_END = "<!-- /r1v-quant:quality -->"
# Rows of the quality table, as `r1v-quant check` reports them: key -> column heading.
QUALITY_COLUMNS = {
    "artifact": "artifact",
    "size": "size",
    "ppl_ratio": "PPL ratio",
    "kld": "KLD",
    "top1": "top-1 %",
    "bench_delta": "bench Δ",
}
LIBRARY = {"awq": "transformers", "gguf": "gguf", "onnx": "onnx"}
TAGS = {
    "awq": ["awq", "int4", "4-bit", "vllm"],
    "gguf": ["gguf", "llama.cpp"],
    "onnx": ["onnx", "onnxruntime", "vision-encoder"],
}
VERSIONS = {
    "awq": ["torch", "safetensors", "tokenizers"],
    "gguf": ["torch", "gguf", "llama-cpp-python"],
    "onnx": ["torch", "onnx", "onnxruntime", "onnxruntime-gpu"],
}


@dataclass
class Card:
    kind: str  # awq | gguf | onnx
    source: Path  # the 16-bit model directory the artifact was made from
    folder: str  # the artifact folder as the user named it (used in the run commands)
    summary: str  # one line: what this artifact is
    commands: list[str]  # how it was made
    details: dict[str, Any]  # quantization settings and results, one table row each
    files: dict[str, int]  # file -> bytes
    versions: dict[str, str] = field(default_factory=dict)
    calibration_set_hash: str | None = None
    quality: list[dict[str, Any]] | None = None
    extra_tags: list[str] = field(default_factory=list)
    run_files: list[str] = field(default_factory=list)  # GGUF: the language model's first file, mmproj
    # the planner's serving commands per device group (serve_commands.card_commands); [] = none planned
    serve: list[dict[str, Any]] = field(default_factory=list)


# -- the source model ---------------------------------------------------------------------------------------
def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when absent or unreadable)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_info(source: Path) -> dict[str, Any]:
    """base_model, revision and license of the source model, as far as its files say."""
    source = Path(source)
    hub = hub_source(source)
    fm = front_matter(source / CARD_NAME)
    try:
        cfg = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        cfg = {}
    base = hub.repo_id if hub else None
    name_or_path = cfg.get("_name_or_path")
    if base is None and isinstance(name_or_path, str) and is_repo_id(name_or_path):
        base = name_or_path
    info: dict[str, Any] = {
        "name": model_name(source),
        "base_model": base,
        "revision": hub.commit if hub else None,
        "flavor": None,
        "license": None,
    }
    lic = fm.get("license", cfg.get("license"))
    if isinstance(lic, str) or (isinstance(lic, list) and all(isinstance(x, str) for x in lic)):
        info["license"] = lic
        for key in ("license_name", "license_link"):
            if isinstance(fm.get(key), str):
                info[key] = fm[key]
    return info


# -- rendering ----------------------------------------------------------------------------------------------
def _size(n: int | float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if key == "size" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _size(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def quality_block(rows: list[dict[str, Any]] | None) -> str:
    if not rows:
        body = (
            "Not measured yet. `r1v-quant check` compares this artifact with the 16-bit model (KL "
            "divergence, perplexity ratio, top-1 agreement, benchmark deltas) and writes its table here."
        )
    else:
        head = "| " + " | ".join(QUALITY_COLUMNS.values()) + " |"
        rule = "|" + "---|" * len(QUALITY_COLUMNS)
        lines = [head, rule]
        lines += ["| " + " | ".join(_cell(k, r.get(k)) for k in QUALITY_COLUMNS) + " |" for r in rows]
        body = (
            "Measured by `r1v-quant check` against the 16-bit model (PPL ratio: quantized / 16-bit "
            "perplexity; KLD: mean KL divergence of the next-token distributions; top-1: agreement of the "
            "argmax token).\n\n" + "\n".join(lines)
        )
    return f"{QUALITY_BEGIN}\n{body}\n{QUALITY_END}"


def _yaml(card: Card, src: dict[str, Any]) -> str:
    meta: dict[str, Any] = {}
    if src["base_model"]:
        meta["base_model"] = src["base_model"]
        meta["base_model_relation"] = "quantized"
    meta["license"] = src["license"] or "other"
    for key in ("license_name", "license_link"):
        if key in src:
            meta[key] = src[key]
    meta["library_name"] = LIBRARY[card.kind]
    meta["pipeline_tag"] = "image-text-to-text"
    tags = ["r1v-quant", "skywork-r1v", "internvl", "multimodal", "reasoning", "quantized"]
    meta["tags"] = list(dict.fromkeys([*tags, *TAGS[card.kind], *card.extra_tags]))
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)


def render_card(card: Card) -> str:
    src = source_info(card.source)
    if src["base_model"]:
        at = f" at revision `{src['revision']}`" if src["revision"] else ""
        origin = f"[{src['base_model']}](https://huggingface.co/{src['base_model']}){at}"
    else:
        origin = f"the local checkpoint `{src['name']}` (not a Hub repo: add `base_model` before uploading)"
    title = Path(card.folder).name or card.folder
    parts = [f"---\n{_yaml(card, src)}---\n", f"# {title}\n", f"{card.summary}, made from {origin}.\n"]
    if not src["license"]:
        parts.append(
            "**License:** the source model's README.md front matter names no license, so this card says "
            "`other`: check the source model's terms before sharing this artifact.\n"
        )
    parts.append("## Files\n\n| file | size |\n|---|---|")
    parts += [f"| `{name}` | {_size(n)} |" for name, n in sorted(card.files.items())]
    parts.append("")
    parts.append("## How it was made\n")
    parts.append("```bash\n" + "\n".join(card.commands) + "\n```\n")
    facts = {
        **card.details,
        "calibration set (sha256 of manifest + images)": card.calibration_set_hash,
        "versions": ", ".join(f"{k} {v}" for k, v in card.versions.items()),
    }
    parts.append("| setting | value |\n|---|---|")
    parts += [f"| {k} | {_cell(k, v)} |" for k, v in facts.items() if v not in (None, "", [], {})]
    parts.append("")
    parts.append("## How to run\n")
    parts.append(_RUN[card.kind](card))
    parts.append("## Quality\n")
    parts.append(quality_block(card.quality) + "\n")
    parts.append(
        "## Safety\n\nWeights are stored as data (safetensors, GGUF or ONNX with JSON side files); nothing "
        "here is pickled. Any `*.py` files are the source model's remote code copied byte for byte: "
        "r1v-quant never runs them, and other loaders run them only with `trust_remote_code`.\n"
    )
    return "\n".join(parts)


def _serve_block(card: Card, engine: str, what: str, model_args: str) -> str:
    """The planner's commands per device (`r1v-quant plan ... --emit ENGINE`), or why there are none."""
    if not card.serve:
        return ""
    lines = []
    for group in card.serve:
        sizes = ", ".join(d.partition(":")[2].removesuffix("GB") for d in group["devices"])
        kind = "GPU" if group["devices"][0].startswith("gpu") else "RAM"
        if group["command"] is None:
            lines.append(f"# {sizes} GiB {kind}: {group['note']}")
        else:
            lines += [f"# {sizes} GiB {kind}: {group['note']}", group["command"]]
    return (
        f"{what}: the command `r1v-quant plan {model_args} --device gpu:SIZE --emit {engine}` prints, per "
        "device size (`cpu:SIZE` for RAM; a 32768-token context or the model's limit, one image of the most "
        "tiles, one sequence; numbers from r1v-quant's planner, docs/profile-and-plan.md):\n\n"
        "```bash\n" + "\n".join(lines) + "\n```\n"
    )


def _run_awq(card: Card) -> str:
    d = card.folder
    vllm = _serve_block(
        card, "vllm", "vLLM (>= 0.21; the Marlin AWQ kernels need compute capability 8.0)", f"--model {d}"
    )
    return f"""{vllm}

transformers with Skywork's remote code (an AWQ kernel package such as `autoawq` or `gptqmodel` must be
installed for the int4 linears):

```python
import torch
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{d}", torch_dtype=torch.float16, trust_remote_code=True, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{d}", trust_remote_code=True, use_fast=False)
```

r1v-quant (CPU, dequantised; no remote code):

```bash
r1v-quant generate {d} -p "<image>What is shown in the picture?" --image picture.png
r1v-quant chat --model {d}
```
"""


def _run_gguf(card: Card) -> str:
    d, (m, *mmprojs) = card.folder, card.run_files or ["MODEL.gguf"]
    if not mmprojs:
        server = _serve_block(card, "llama-server", "llama-server", f"--model {d}/{m}")
        return f"""This folder holds the language model only (no mmproj): text in, text out.

```bash
llama-cli -m {d}/{m} -p "Solve 12 * 13." -n 512
r1v-quant chat --gguf {d}/{m}
```

{server}"""
    mm = mmprojs[0]
    server = _serve_block(card, "llama-server", "llama-server", f"--model {d}/{m} --mmproj {d}/{mm}")
    return f"""llama.cpp (the vision tower and projector are the `--mmproj` file):

```bash
llama-mtmd-cli -m {d}/{m} --mmproj {d}/{mm} --image picture.png -p "What is shown in the picture?"
```

{server}

`llama-mtmd-cli` and `llama-server` tile non-square images by llama.cpp's own rule, not InternVL's;
r1v-quant's llama.cpp runtime tiles them exactly as the original model does:

```bash
r1v-quant chat --gguf {d}/{m} --mmproj {d}/{mm}
```
"""


def _run_onnx(card: Card) -> str:
    d = card.folder
    return f"""The vision tower, pixel shuffle and `mlp1`: `pixel_values` [tiles, 3, 448, 448] ->
`image_embeds` [tiles, 256, hidden]. `preprocessing.json` describes the tiling and normalisation
exactly. Pair it with a language model (for example this model's GGUF) that takes the embeddings at the
`<IMG_CONTEXT>` positions.

onnxruntime:

```python
import onnxruntime as ort

session = ort.InferenceSession("{d}/vision.onnx", providers=["CPUExecutionProvider"])
(image_embeds,) = session.run(None, {{"pixel_values": pixel_values}})  # float32
```

r1v-quant: with a language-model GGUF in a chat (`r1v-quant chat --gguf MODEL.gguf --vision-onnx {d}`),
or from Python (preprocessing included, explicit execution provider):

```python
from r1v_quant.runtime.onnx import OnnxVisionEncoder

encoder = OnnxVisionEncoder("{d}", provider="cpu")
image_embeds, tiles = encoder.encode_image("picture.png")
```
"""


_RUN = {"awq": _run_awq, "gguf": _run_gguf, "onnx": _run_onnx}


def write_card(out_dir: Path | str, card: Card) -> Path:
    """Render `card` into OUT_DIR/README.md atomically; an earlier measured quality table is kept."""
    path = Path(out_dir) / CARD_NAME
    text = render_card(card)
    if card.quality is None and path.is_file():
        old = _quality_span(path.read_text(encoding="utf-8"))
        if old is not None:
            new = _quality_span(text)
            assert new is not None
            text = text[: new[0]] + old[2] + text[new[1] :]
    write_text_atomic(path, text)
    return path


def _quality_span(text: str) -> tuple[int, int, str] | None:
    a = text.find(QUALITY_BEGIN)
    b = text.find(QUALITY_END, a + 1)
    if a < 0 or b < 0:
        return None
    b += len(QUALITY_END)
    return a, b, text[a:b]


def update_card_quality(out_dir: Path | str, report: Path | str | dict | list) -> Path:
    """Put a quality table into an existing card (what `r1v-quant check` calls after measuring).

    `report`: rows as a list of dicts with the keys of QUALITY_COLUMNS (`artifact` required; `size` in
    bytes or text; the others numbers or text), or a dict holding them under "quality" or "rows", or a
    path to such a JSON file.
    """
    path = Path(out_dir) / CARD_NAME
    if not path.is_file():
        raise R1VError(f"{out_dir}: no {CARD_NAME} model card to add the quality table to")
    if isinstance(report, (str, Path)):
        try:
            report = json.loads(Path(report).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise R1VError(f"{report}: not a readable JSON quality report ({e})") from None
    rows = report.get("quality", report.get("rows")) if isinstance(report, dict) else report
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and r.get("artifact") for r in rows)
    ):
        raise R1VError("quality report: expected a non-empty list of rows, each a dict with an 'artifact'")
    text = path.read_text(encoding="utf-8")
    span = _quality_span(text)
    block = quality_block(rows)
    text = (
        text[: span[0]] + block + text[span[1] :]
        if span
        else text.rstrip("\n") + f"\n\n## Quality\n\n{block}\n"
    )
    write_text_atomic(path, text)
    return path


# -- provenance ---------------------------------------------------------------------------------------------
def versions(kind: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    out = {"r1v-quant": __version__}
    for pkg in VERSIONS[kind]:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    for k, v in (extra or {}).items():
        if isinstance(v, str) and k not in ("r1v_quant",):
            out.setdefault(k, v)
    return out


def model_arg(source: Path) -> list[str]:
    """MODEL as a user would type it: the Hub repo id pinned to its commit, or the local path."""
    hub = hub_source(source)
    return [hub.repo_id, "--revision", hub.commit] if hub else [str(source)]


def command_line(command: str, model: Path, options: dict[str, Any]) -> str:
    """The command that made an artifact.

    Inside the click command itself, it is rebuilt from the parsed parameters (every option that differs
    from its default, so options added later show up too); otherwise from `options` (name -> value; True
    is a bare flag, False / None are left out). A Hub source is pinned to its commit with `--revision`.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.info_name == command and ctx.command is not None:
        return _from_context(ctx, model)
    parts = ["r1v-quant", command, *model_arg(model)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value not in (None, False):
            parts += [flag, str(value)]
    return shlex.join(parts)


def _from_context(ctx: click.Context, model: Path) -> str:
    parts = ["r1v-quant", str(ctx.info_name)]
    hub = hub_source(model)
    for p in ctx.command.params:
        value = ctx.params.get(p.name or "")
        if p.name == "revision" and hub is not None:
            value = hub.commit  # a branch moves; the commit is what was quantized
        if isinstance(p, click.Argument):
            parts += [str(v) for v in _as_list(value)]
        elif isinstance(p, click.Option) and p.name not in NOT_RECORDED and value is not None:
            if value == p.get_default(ctx):
                continue
            flag = max(p.opts, key=len)
            if p.is_flag:
                parts += [flag] if value else list(p.secondary_opts[:1])
            else:
                for v in _as_list(value):
                    parts += [flag, str(v)]
    return shlex.join(parts)


def _as_list(value: Any) -> Iterable[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -- per exporter -------------------------------------------------------------------------------------------
def _files(folder: Path, names: Iterable[str] | None = None) -> dict[str, int]:
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    return {p.name: p.stat().st_size for p in paths if p.is_file() and p.name != CARD_NAME}


def awq_card(report: dict[str, Any], source: Path, folder: Path, out_name: str | None = None) -> Card:
    """Card for an AWQ checkpoint directory (`folder` may still be its temporary name)."""
    o, qc = report["options"], report["quantization_config"]
    keep = ("calib", "samples", "seq_len", "text_ratio", "seed", "group_size", "modality_weights", "method",
            "propagate", "vision")  # fmt: skip
    out_name = out_name or folder.name
    cmd = command_line("awq", source, {"out": out_name, **{k: o[k] for k in keep if k in o}})
    layers = report.get("layers", [])
    rtn = report.get("loss_rtn_sum") or 0.0
    vis = report.get("vision") or {}
    cos = (vis.get("embedding_cosine") or {}).get("searched") or {}
    return Card(
        kind="awq",
        source=source,
        folder=out_name,
        summary=f"AWQ int4 (group size {qc['group_size']}, AutoAWQ GEMM layout) of the language model"
        + (
            " and the vision tower; `mlp1`, embeddings and `lm_head` kept 16-bit"
            if vis.get("mode") == "int4"
            else "; vision tower, `mlp1`, embeddings and `lm_head` kept 16-bit"
        ),
        commands=[cmd],
        details={
            "quantization": f"{qc['quant_method']} {qc['version']}, {qc['bits']}-bit, zero point "
            f"{qc['zero_point']}, group size {qc['group_size']}",
            "kept 16-bit": ", ".join(qc["modules_to_not_convert"]),
            "method": o.get("method"),
            "loss weights by modality": o.get("modality_weights"),
            "calibration": f"{o.get('calib')}: {o.get('samples')} samples × up to {o.get('seq_len')} tokens",
            "layers": len(layers),
            "vision tower": f"int4, {vis['quantized_layers']} layers; image-embedding cosine vs 16-bit "
            f"{cos.get('mean')} (min {cos.get('min')}) on {vis.get('score_tiles')} calibration tiles"
            if vis.get("mode") == "int4"
            else "16-bit",
            "block-output loss vs round-to-nearest": f"{report['loss_sum'] / rtn:.3f}×" if rtn > 0 else None,
            "plain-rounding fallback layers": ", ".join(map(str, report.get("fallback_layers", [])))
            or "none",
            "run report": f"`{AWQ_REPORT}`: per-layer losses and choices, timings, memory",
        },
        # the report's size changes with its timings: left out, so a resumed run's card is the same bytes
        files={k: v for k, v in _files(folder).items() if k != AWQ_REPORT},
        versions=versions("awq", report.get("versions")),
        calibration_set_hash=report.get("calibration_set_hash"),
        serve=_planned(folder, "vllm", serve_model=out_name),
    )


def _planned(path: Path, engine: str, **kw: Any) -> list[dict[str, Any]]:
    """The planner's commands for the card; [] when the artifact cannot be planned (the card says so by
    leaving the block out rather than failing the export)."""
    from r1v_quant.plan.serve_commands import card_commands

    try:
        return card_commands(path, engine, **kw)
    except R1VError:
        return []


def onnx_card(report: dict[str, Any], source: Path, folder: Path, out_name: str | None = None) -> Card:
    """Card for an ONNX folder (`folder` may still be its temporary name; `out_name` is the final one)."""
    v = report.get("verification") or {}
    out_name = out_name or str(folder)
    opts = {"out": out_name, "dtype": report.get("dtype"), "int8": bool(report.get("int8")),
            "opset": report.get("opset")}  # fmt: skip
    return Card(
        kind="onnx",
        source=source,
        folder=out_name,
        summary=f"The vision tower, pixel shuffle and `mlp1` as ONNX ({report.get('weights')} weights, opset "
        f"{report.get('opset')}, dynamic tile axis)",
        commands=[command_line("onnx", source, opts)],
        details={
            "input": f"{report['input']['name']} {report['input']['shape']} {report['input']['dtype']}",
            "output": f"{report['output']['name']} {report['output']['shape']} {report['output']['dtype']}",
            "weights": report.get("weights"),
            "external data": report.get("external_data") or "none (inline)",
            "vs torch (2 tiles)": f"max abs diff {v['max_abs_diff']:.2e}, min cosine {v['cosine_min']:.6f}"
            if v
            else None,
        },
        files=_files(folder),
        versions=versions("onnx", report.get("versions")),
    )


def read_gguf_manifest(out_dir: Path | str) -> dict[str, Any]:
    """OUT_DIR/gguf_export.json, or a new one; refused in one line when the file is not one of ours.

    `gguf` checks it before writing anything (under the folder's lock), so a foreign file never costs an
    export. A manifest that is not JSON at all (damaged) is rebuilt from the runs that follow; the card
    still lists every file present.
    """
    path = Path(out_dir) / GGUF_MANIFEST
    fresh: dict[str, Any] = {"format": GGUF_FOLDER_FORMAT, "version": 1, "files": {}}
    if not path.exists():
        return fresh
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return fresh
    except OSError as e:
        raise os_error(e, path, "read the folder's manifest") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != GGUF_FOLDER_FORMAT
        or not isinstance(data.get("files"), dict)
        or not all(isinstance(e, dict) for e in data["files"].values())
    ):
        raise R1VError(
            f"{path}: not a manifest written by r1v-quant gguf (expected format {GGUF_FOLDER_FORMAT!r}); "
            "choose another --out or move the file"
        )
    return data


def write_gguf_card(out_dir: Path | str, source: Path, run: dict[str, Any], options: dict[str, Any]) -> Path:
    """Record this run's GGUF files in OUT_DIR/gguf_export.json and (re-)render the folder's card from it.

    A GGUF folder collects several runs (one per quant type); the manifest keeps how each file was made.
    `run` is the `gguf` command's report ({"llm": {...}, "mmproj": {...}}, paths as written: `path` the
    first shard, `files` every shard, `imatrix` the importance matrix); `options` its settings, used for
    the command line only outside the click command.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / GGUF_MANIFEST
    manifest = read_gguf_manifest(out_dir)
    cmd = command_line("gguf", source, {"out": str(out_dir), **options})
    primary = {}
    for role, part in run.items():
        name = Path(part["path"]).name
        primary[role] = name
        entry = {k: part[k] for k in _GGUF_KEEP if k in part}
        entry["shards"] = [Path(f).name for f in part.get("files", [part["path"]])]
        if isinstance(part.get("imatrix"), dict):
            entry["imatrix"] = {**part["imatrix"], "path": Path(part["imatrix"]["path"]).name}
        entry.update(role=role, command=cmd, source=str(Path(source).resolve()), versions=versions("gguf"))
        manifest["files"][name] = entry
    manifest["files"] = {k: v for k, v in sorted(manifest["files"].items()) if (out_dir / k).is_file()}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, default=str) + "\n")

    entries = manifest["files"]
    names = [
        n for e in entries.values() for n in [*e.get("shards", []), e.get("imatrix", {}).get("path")] if n
    ]
    llms = [n for n, e in entries.items() if e.get("role") == "llm"]
    mmprojs = [n for n, e in entries.items() if e.get("role") == "mmproj"]
    calib = sorted({e["calibration_set_hash"] for e in entries.values() if e.get("calibration_set_hash")})
    types = sorted({str(e.get("type")) for n, e in entries.items() if n in llms})
    summary = f"llama.cpp GGUF of the language model ({', '.join(types) or 'none'})"
    if mmprojs:
        summary += " plus an mmproj GGUF of the vision tower and `mlp1`"
    card = Card(
        kind="gguf",
        source=source,
        folder=str(out_dir),
        summary=summary,
        commands=list(dict.fromkeys(e["command"] for e in entries.values())),
        details={f"`{n}`": _gguf_fact(e) for n, e in entries.items()},
        files=_files(out_dir, [*names, *(n for n in _files(out_dir) if n.endswith(".gguf"))]),
        versions=versions("gguf"),
        calibration_set_hash=", ".join(calib) or None,
        extra_tags=types,
        run_files=[
            primary.get("llm") or (llms[-1] if llms else "MODEL.gguf"),
            *([primary.get("mmproj") or mmprojs[-1]] if mmprojs else []),
        ],
    )
    m, *mm = card.run_files
    if (out_dir / m).is_file():
        card.serve = _planned(
            out_dir / m, "llama-server", mmproj=out_dir / mm[0] if mm else None, serve_model=f"{out_dir}/{m}",
            serve_mmproj=f"{out_dir}/{mm[0]}" if mm else None,
        )  # fmt: skip
    return write_card(out_dir, card)


_GGUF_KEEP = ("type", "bytes", "tensors", "seconds", "intermediate", "position_fix", "calibration_set_hash")


def _gguf_fact(e: dict[str, Any]) -> str:
    fact = f"{e.get('role')}, {e.get('type')}, {e.get('tensors')} tensors"
    if e.get("intermediate"):
        fact += f", quantized by llama.cpp from {e['intermediate']}"
    if len(e.get("shards", [])) > 1:
        fact += f", {len(e['shards'])} shards"
    if e.get("imatrix"):
        used = "used by the quantizer" if e["imatrix"].get("used_by_quantizer") else "written alongside"
        fact += f", importance matrix `{e['imatrix']['path']}` ({used})"
    if "--activation-aware" in e.get("command", ""):
        fact += ", activation-aware scales folded in"
    if e.get("position_fix"):
        fact += f", position rows {e['position_fix']}"
    return fact
