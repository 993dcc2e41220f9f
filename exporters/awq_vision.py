"""`r1v-quant awq --vision int4`: the InternViT tower searched and packed like the decoder, layer by layer.

Data flow: the calibration set's image tiles (every sample with an image, the renderer's real
preprocessing) -> patch embeddings -> per ViT layer: load it (one resident, on --device), run every tile
through the 16-bit layer accumulating mean |x| of each linear's input (the hidden states of all tiles
live in the activation store, so they spill under --max-memory like the decoder's), then the search of
r1v_quant/quant/vision_search.py on a fixed subset of score tiles, the packed result saved in the work folder
(so --resume skips it). The next layer sees the 16-bit outputs. At the end the score tiles' image
embeddings after pixel shuffle + mlp1 are compared with the 16-bit ones (per-token cosine), for the
searched tower and for plain rounding.

vLLM builds a linear with the AWQ method unless a name in `modules_to_not_convert` is a substring of its
prefix (docs/awq.md): with the tower quantized the list is ["mlp1", "lm_head"], so every
`vision_model.encoder.layers.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}` is AWQ and mlp1 stays 16-bit.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from r1v_quant.exporters.awq_layers import layer_tensors, load_layer_result, load_saved_layer
from r1v_quant.model.awq_layout import unpack_awq
from r1v_quant.model.groupwise import check_group
from r1v_quant.model.vision import Projector, VisionEmbeddings, VisionLayer, pixel_shuffle
from r1v_quant.quant.awq_search import AWQConfig, _round_params_fp16
from r1v_quant.quant.vision_search import (
    VISION_MODES,
    VIT_LINEARS,
    VitInputStats,
    VitSearch,
    apply_vit_quantized,
    embedding_channel_weights,
    quantize_vit_layer,
    rtn_vit_layer,
)
from r1v_quant.util.atomic import atomic_file
from r1v_quant.util.errors import R1VError

VIT_LAYER_PREFIX = "vision_model.encoder.layers"
VISION_WORK = "vision"
INT8_REFUSAL = (
    "--vision int8: vLLM's AWQ kernels (awq, awq_marlin) load 4-bit weights only, and one checkpoint has one "
    "bit width, so an 8-bit tower would make the checkpoint unloadable; use int4 or 16bit (8-bit quality "
    "is measured in bench/awq_vision.py; llama.cpp's mmproj offers Q8_0)"
)


def vision_config(group_size: int = 128, bits: int = 4) -> AWQConfig:
    """The tower's search settings: the decoder's, without the clipping search. Measured on the replica
    (bench/awq_vision.py --ablation): clipping cuts the block-output error most (0.22x plain rounding
    alone) but moves the image embeddings away from 16-bit (held-out 1 - cos 6.3e-9 against plain
    rounding's 3.2e-9); the scales alone give 1.2e-9."""
    return AWQConfig(group_size=group_size, bits=bits, apply_clip=False)


def modules_to_not_convert(vision: str) -> list[str]:
    """What vLLM must build unquantized (substring match against each linear's prefix)."""
    return ["mlp1", "lm_head"] if vision == "int4" else ["vision_model", "mlp1", "lm_head"]


def vision_depth(spec: Any) -> int:
    """ViT layers that feed the image embeddings (hidden_states[select_layer]); the rest are never run."""
    return spec.select_layer % (spec.vision.num_layers + 1)


def check_vision_option(spec: Any, vision: str, group_size: int) -> None:
    if vision == "int8":
        raise R1VError(INT8_REFUSAL)
    if vision not in VISION_MODES:
        raise R1VError(f"unknown --vision {vision!r}: expected int4 or 16bit")
    if vision == "int4":
        v = spec.vision
        check_group(v.hidden_size, group_size, "the vision hidden size")
        check_group(v.intermediate_size, group_size, "the vision MLP width")


def score_tiles(tiles_per_sample: list[int], k: int) -> list[tuple[int, int]]:
    """About k (sample, tile) pairs evenly spaced over all tiles in sample order (all of them if fewer)."""
    pairs = [(j, t) for j, n in enumerate(tiles_per_sample) for t in range(n)]
    n = len(pairs)
    if n <= k:
        return pairs
    return [pairs[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def _fake_quant_from_tensors(layer: VisionLayer, tensors: dict[str, torch.Tensor]) -> None:
    """A saved ViT layer result (packed linears + fp16 state) back into `layer` as fake-quant weights."""
    q = {
        n: unpack_awq(tensors[f"{n}.qweight"], tensors[f"{n}.qzeros"], tensors[f"{n}.scales"])
        for n in VIT_LINEARS
    }
    dtype = next(layer.parameters()).dtype
    with torch.no_grad():
        for k, v in tensors.items():
            if not k.endswith((".qweight", ".qzeros", ".scales")):
                mod, _, p = k.rpartition(".")
                (layer.get_submodule(mod) if mod else layer).get_parameter(p).copy_(v.to(dtype))
    apply_vit_quantized(layer, q)


def embedding_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Per-token cosine of embeddings `a` against the reference `b` (mean, min, and 1 - mean to 3 digits,
    since the mean alone rounds to 1 for small errors) and the relative L2 error over all tokens."""
    x, y = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    c = F.cosine_similarity(x, y, dim=-1)
    return {
        "mean": round(float(c.mean()), 8),
        "min": round(float(c.min()), 8),
        "one_minus_mean": float(f"{float(1 - c.mean()):.3e}"),
        "relative_l2": float(f"{float((x - y).norm() / y.norm()):.3e}"),
    }


@torch.no_grad()
def search_vision(
    prep: Any,  # calibration.pipeline.Prepared
    budget: int | None,
    cfg: AWQConfig,
    method: str,
    device: torch.device,
    work: Path,
    *,
    progress: bool = True,
    knobs: VitSearch | None = None,
    on_layer: Callable[[int, VisionLayer], None] | None = None,
) -> dict[str, Any]:
    """Search and save every ViT layer that feeds the embeddings into `work/vision/NNNNN.safetensors`
    (a layer already there, from an interrupted run, is reused); returns the vision report.
    `on_layer(i, fake_quant_layer)` sees each finished layer. With cfg.bits other than 4 nothing is saved
    (the AWQ GEMM layout is 4-bit): that is for measuring 8 bits (bench/awq_vision.py) through `on_layer`.

    The tiles' hidden states live in a store of their own with the run's --max-memory `budget` (spilling
    into the work folder beyond it), closed before the decoder's capture starts; the preflight plan does
    not count it (docs/awq.md)."""
    from r1v_quant.calibration.store import ActivationStore

    t0 = time.perf_counter()
    knobs = knobs or VitSearch()
    todo = [j for j, r in enumerate(prep.rendered) if r.image_keys]
    if not todo:
        raise R1VError("--vision int4: the calibration set has no image samples to calibrate the tower on")
    (work / VISION_WORK).mkdir(parents=True, exist_ok=True)
    store = ActivationStore(budget, work / "vision-spill")
    try:
        return _search(prep, store, todo, cfg, method, device, work, progress, knobs, t0, on_layer)
    finally:
        store.close()


def _search(
    prep: Any,
    store: Any,
    todo: list[int],
    cfg: AWQConfig,
    method: str,
    device: torch.device,
    work: Path,
    progress: bool,
    knobs: VitSearch,
    t0: float,
    on_layer: Callable[[int, VisionLayer], None] | None,
) -> dict[str, Any]:
    from r1v_quant.calibration.capture import _loaded
    from r1v_quant.calibration.store import ActivationList

    ckpt, spec = prep.ckpt, prep.ckpt.spec
    v = spec.vision
    depth = vision_depth(spec)
    hidden = ActivationList(store, "vit_awq_hidden", len(todo))
    embeddings = _loaded(
        lambda: VisionEmbeddings(v), ckpt.with_prefix("vision_model.embeddings"), torch.float32, device
    )
    counts = []
    for i, j in enumerate(todo):
        hidden[i] = embeddings(prep.renderer.pixels(prep.rendered[j], prep.cset).to(device)).cpu()
        counts.append(hidden[i].shape[0])
    del embeddings
    proj = _loaded(
        lambda: Projector(spec.projector_in, spec.llm.hidden_size),
        ckpt.with_prefix("mlp1"),
        torch.float32,
        device,
    )
    _round_params_fp16(proj)  # the checkpoint stores mlp1 in fp16: compare what a loader computes
    weight = embedding_channel_weights(proj, v.hidden_size) if knobs.embedding_weights else None
    picks = score_tiles(counts, knobs.score_tiles)
    ref = torch.stack([hidden[i][t] for i, t in picks]).to(device)  # the score tiles, 16-bit chain
    quant, rtn = ref.clone(), ref.clone()  # the same tiles through the quantized / plain-rounded tower
    layers: list[dict] = []
    bar = tqdm(total=depth, desc=f"vision {method}", unit="layer", disable=not progress)
    try:
        for li in range(depth):
            layer = _loaded(lambda: VisionLayer(v), ckpt.layer(li, vision=True), torch.float32, device).eval()
            stats = VitInputStats()
            for i in range(len(todo)):  # tiles are independent in the ViT: update in place
                hidden[i] = stats.run(layer, hidden[i].to(device)).cpu()
            plain = copy.deepcopy(layer)
            q_rtn = rtn_vit_layer(plain, cfg)
            _round_params_fp16(plain)
            apply_vit_quantized(plain, q_rtn)
            path = work / VISION_WORK / f"{li:05d}.safetensors"
            saved = load_saved_layer(path, li) if cfg.bits == 4 else None
            nxt = layer(ref)
            if saved is not None:
                report, tensors = saved
                _fake_quant_from_tensors(layer, tensors)
                report["resumed"] = True
            else:
                res = quantize_vit_layer(li, layer, ref, stats.mean_abs(), cfg, method, knobs, weight)
                res.quantized = {k: _cpu(qw) for k, qw in res.quantized.items()}
                res.state = {k: t.cpu() for k, t in res.state.items()}
                report = res.report
                if cfg.bits == 4:
                    with atomic_file(path) as tmp:
                        save_file(layer_tensors(res), str(tmp), metadata={"report": json.dumps(report)})
            if on_layer:
                on_layer(li, layer)
            quant, rtn, ref = layer(quant), plain(rtn), nxt
            layers.append(report)
            bar.update(1)
            bar.set_postfix(layer=li, loss=f"{report['loss']:.2e}", rtn=f"{report['loss_rtn']:.2e}")
            del layer, plain
    finally:
        bar.close()

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = x[:, 1:, :]
        n, t, c = x.shape
        side = int(t**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, c), spec.downsample_ratio, spec.ps_version)
        return proj(x.reshape(n, -1, x.shape[-1]))

    e16 = embed(ref)
    return {
        "mode": f"int{cfg.bits}",
        "method": method,
        "layers": layers,
        "quantized_layers": depth,
        "tiles": sum(counts),
        "score_tiles": len(picks),
        "fallback_layers": [r["layer"] for r in layers if r.get("fallback")],
        "loss_sum": sum(r["loss"] for r in layers),
        "loss_rtn_sum": sum(r["loss_rtn"] for r in layers),
        # per-token cosine of the score tiles' image embeddings (after mlp1) against the 16-bit tower
        "embedding_cosine": {
            "searched": embedding_agreement(embed(quant), e16),
            "round_to_nearest": embedding_agreement(embed(rtn), e16),
        },
        "memory": {"peak_cached_ram_bytes": store.peak_mem_bytes, "spilled_bytes": store.spilled_total},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _cpu(qw):  # QuantizedWeight
    qw.q, qw.scales, qw.zeros = qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu()
    return qw


def vision_tensor_names(depth: int) -> set[str]:
    """Prefixes of the ViT layers whose 16-bit tensors the packed ones replace."""
    return {f"{VIT_LAYER_PREFIX}.{i}." for i in range(depth)}


def packed_vision_layers(work: Path, depth: int):
    """(checkpoint name, tensor) of every saved ViT layer, in order, for the assembly."""

    for i in range(depth):
        _, tensors = load_layer_result(work / VISION_WORK / f"{i:05d}.safetensors", i)
        for k, t in tensors.items():
            yield f"{VIT_LAYER_PREFIX}.{i}.{k}", t
