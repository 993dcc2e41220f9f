"""Layer-by-layer activation capture: the data-movement half of calibration, AWQ and GPTQ-style search.

Images go through the vision tower (also one ViT layer at a time) and mlp1 once; their features overwrite
the token embeddings at the <IMG_CONTEXT> positions. Then, for each decoder layer: load that one layer
from the checkpoint, run every sample through it (recording linear-input statistics through hooks), hand
the layer with its inputs and outputs to the caller, and keep the outputs as the next layer's inputs.
Peak RAM is one layer plus the cached activations, and those spill to disk beyond the memory budget.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from r1v_quant.checkpoint import Checkpoint
from r1v_quant.llm import Qwen2Layer, rope_cos_sin
from r1v_quant.norms import RMSNorm
from r1v_quant.vision import Projector, VisionEmbeddings, VisionLayer, pixel_shuffle

from .dataset import CalibrationSet
from .render import MODALITIES, RenderedSample, Renderer
from .stats import LayerStats
from .store import ActivationList, ActivationStore

EMBED_NAME = "language_model.model.embed_tokens.weight"
FINAL_NORM = "language_model.model.norm"
LM_HEAD = "language_model.lm_head.weight"

M = TypeVar("M", bound=torch.nn.Module)


def _loaded(build: Callable[[], M], state: dict[str, torch.Tensor], dtype: torch.dtype) -> M:
    """`build()` on the meta device, then given the checkpoint tensors: no random init, no second copy."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(_cast(state, dtype), strict=True, assign=True)
    return module


def load_decoder_layer(ckpt: Checkpoint, index: int, dtype: torch.dtype = torch.float32) -> Qwen2Layer:
    """One Qwen2 decoder layer with its checkpoint weights (nothing else of the LLM is loaded)."""
    return _loaded(lambda: Qwen2Layer(ckpt.spec.llm), ckpt.layer(index), dtype).eval()


@dataclass
class LayerCapture:
    """Decoder layer `index` with everything a block-wise search needs, valid until the next layer.

    `inputs[j]` / `outputs[j]`: (n_j, hidden) hidden states of sample j entering / leaving the layer (the
    outputs from the layer as loaded, i.e. the 16-bit target); `modality[j]`: (n_j,) codes (render.py);
    `stats`: the linear-input statistics of this layer over all samples.
    """

    index: int
    layer: Qwen2Layer
    inputs: ActivationList
    outputs: ActivationList
    modality: Sequence[torch.Tensor]
    stats: LayerStats | None
    _cos: torch.Tensor = field(repr=False)
    _sin: torch.Tensor = field(repr=False)

    def rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..n-1 (every sample starts at position 0)."""
        return self._cos[:n], self._sin[:n]

    @torch.no_grad()
    def run(self, x: torch.Tensor, layer: torch.nn.Module | None = None) -> torch.Tensor:
        """(n, hidden) -> (n, hidden) through `layer` (default: this layer, maybe modified by the caller)."""
        cos, sin = self.rope(x.shape[0])
        return (layer or self.layer)(x[None].to(self._cos.dtype), cos, sin)[0]

    def recompute_outputs(self) -> None:
        """Re-run the (e.g. quantized) layer so the next layer sees its outputs instead of the 16-bit ones."""
        for j in range(len(self.inputs)):
            self.outputs[j] = self.run(self.inputs[j])


@torch.no_grad()
def image_features(
    ckpt: Checkpoint,
    renderer: Renderer,
    cset: CalibrationSet,
    rendered: Sequence[RenderedSample],
    store: ActivationStore,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ActivationList:
    """Per sample with images: (tiles·256, hidden) mlp1 outputs, the ViT run one layer at a time.

    Same math as `extract_feature`, but only one ViT layer is in memory (InternViT-6B is 5.5 B parameters)
    and the per-tile hidden states live in the store, so they spill under a budget like everything else.
    """
    spec, v = ckpt.spec, ckpt.spec.vision
    feats = ActivationList(store, "image_features", len(rendered))
    todo = [j for j, r in enumerate(rendered) if r.image_keys]
    if not todo:
        return feats
    hidden = ActivationList(store, "vit_hidden", len(rendered))
    depth = spec.select_layer % (v.num_layers + 1)  # hidden_states[select_layer]; index 0 = embeddings
    bar = tqdm(total=(depth + 2) * len(todo), desc="vision tower", unit="sample", disable=not progress)
    embeddings = _loaded(lambda: VisionEmbeddings(v), ckpt.with_prefix("vision_model.embeddings"), dtype)
    for j in todo:
        hidden[j] = embeddings(renderer.pixels(rendered[j], cset).to(dtype))
        bar.update(1)
    del embeddings
    for i in range(depth):
        layer = _loaded(lambda: VisionLayer(v), ckpt.layer(i, vision=True), dtype)
        for j in todo:
            hidden[j] = layer(hidden[j])  # samples are independent in the ViT: update in place
            bar.update(1)
        del layer
    proj = _loaded(
        lambda: Projector(spec.projector_in, spec.llm.hidden_size), ckpt.with_prefix("mlp1"), dtype
    )
    for j in todo:
        x = hidden[j][:, 1:, :]  # drop CLS
        n, t, c = x.shape
        side = int(t**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, c), spec.downsample_ratio, spec.ps_version)
        feats[j] = proj(x.reshape(n, -1, x.shape[-1])).reshape(-1, spec.llm.hidden_size)
        store.delete("vit_hidden", j)
        bar.update(1)
    bar.close()
    return feats


@torch.no_grad()
def embed_samples(
    ckpt: Checkpoint,
    rendered: Sequence[RenderedSample],
    feats: ActivationList,
    out: ActivationList,
    *,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Token embeddings with image features written over every <IMG_CONTEXT> (as R1VModel.embed)."""
    table = ckpt.get(EMBED_NAME)  # the one non-layer LLM tensor needed (1.5 GB for 38B); freed below
    ctx = ckpt.spec.tokens.img_context
    for j, rs in enumerate(rendered):
        emb = table[rs.input_ids].to(dtype)
        if rs.image_keys:
            emb[rs.input_ids == ctx] = feats[j].to(dtype)
            feats.store.delete(feats.name, j)
        out[j] = emb
    del table


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: t.to(dtype) for k, t in state.items()}


def _first_inputs(
    ckpt: Checkpoint,
    renderer: Renderer,
    cset: CalibrationSet,
    rendered: Sequence[RenderedSample],
    store: ActivationStore,
    name: str,
    *,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[ActivationList, torch.Tensor, torch.Tensor]:
    """The first decoder layer's inputs (embeddings + image features) as `name` in `store`, and the RoPE
    cos/sin for the longest sample: what every layer-by-layer pass starts from."""
    inputs = ActivationList(store, name, len(rendered))
    feats = image_features(ckpt, renderer, cset, rendered, store, dtype=dtype, progress=progress)
    embed_samples(ckpt, rendered, feats, inputs, dtype=dtype)
    longest = max((r.length for r in rendered), default=1)
    cos, sin = rope_cos_sin(ckpt.spec.llm, torch.arange(longest), dtype)
    return inputs, cos, sin


@torch.no_grad()
def iter_layers(
    ckpt: Checkpoint,
    renderer: Renderer,
    cset: CalibrationSet,
    rendered: Sequence[RenderedSample],
    store: ActivationStore,
    *,
    dtype: torch.dtype = torch.float32,
    collect_stats: bool = True,
    progress: bool = True,
) -> Iterator[LayerCapture]:
    """Yield a LayerCapture per decoder layer, in order. Between yields the previous layer is freed.

    A consumer may modify `capture.layer` in place (scale, quantize) and call `recompute_outputs()` to
    propagate the modified layer's outputs; otherwise the next layer sees the 16-bit outputs.
    """
    n = len(rendered)
    inputs, cos, sin = _first_inputs(
        ckpt, renderer, cset, rendered, store, "inputs", dtype=dtype, progress=progress
    )
    masks = [r.modality for r in rendered]
    num_layers = ckpt.spec.llm.num_layers
    bar = tqdm(total=num_layers * n, desc="decoder layers", unit="sample", disable=not progress)
    try:
        for i in range(num_layers):
            bar.set_postfix(layer=i)
            layer = load_decoder_layer(ckpt, i, dtype)
            outputs = ActivationList(store, "outputs", n)
            stats = LayerStats.for_layer(i, layer) if collect_stats else None
            current: list[torch.Tensor] = [masks[0]] if masks else []
            hooks = stats.hooks(layer, current) if stats else contextlib.nullcontext()
            cap = LayerCapture(i, layer, inputs, outputs, masks, stats, cos, sin)
            with hooks:
                for j in range(n):
                    current[0] = masks[j]
                    outputs[j] = cap.run(inputs[j])
                    bar.update(1)
            yield cap
            store.drop("inputs")
            store.rename("outputs", "inputs")  # outputs become the next layer's inputs, no copy
            del cap, layer
    finally:
        bar.close()


@torch.no_grad()
def layer_sensitivity(
    ckpt: Checkpoint,
    renderer: Renderer,
    cset: CalibrationSet,
    rendered: Sequence[RenderedSample],
    store: ActivationStore,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((decoder layers, 3), (3,)): per layer and modality code, the mean over such tokens of |dL/dh|², h
    the layer's output and L the summed cross-entropy of the response tokens; and the token counts.

    MBQ's modality sensitivity (squared: the Fisher estimate of what an output error on such a token costs
    the answer). Streamed like `iter_layers`, one layer resident at a time: the forward pass keeps the
    inputs of every k-th layer (k ~ sqrt(layers)) in `store`, and the backward pass, from the top, re-runs
    each segment of k layers from its checkpoint before back-propagating through it: about 2·sqrt(layers)
    cached copies of the samples' activations, and each layer loaded three times.
    """
    n, spec = len(rendered), ckpt.spec
    num_layers, response = spec.llm.num_layers, MODALITIES.index("response")
    k = max(1, math.ceil(math.sqrt(num_layers)))
    _, cos, sin = _first_inputs(ckpt, renderer, cset, rendered, store, "sens0", dtype=dtype, progress=False)
    recompute = sum(min(f + k, num_layers) - 1 - f for f in range(0, num_layers, k))
    bar = tqdm(total=2 * num_layers + recompute, desc="sensitivity", unit="layer", disable=not progress)

    def forward(first: int, last: int, keep_every: int) -> None:
        """Layers first..last-1 from the cached input of `first`, caching each input of keep_every."""
        for i in range(first, last):
            layer = load_decoder_layer(ckpt, i, dtype)
            src = ActivationList(store, f"sens{i}", n)
            dst = ActivationList(store, f"sens{i + 1}", n)
            for j in range(n):
                x = src[j]
                dst[j] = layer(x[None], cos[: len(x)], sin[: len(x)])[0]
            if (i - first) % keep_every:
                store.drop(f"sens{i}")
            bar.update(1)
            del layer

    forward(0, num_layers, k)
    norm = RMSNorm(spec.llm.hidden_size, spec.llm.rms_eps)
    norm.weight.copy_(ckpt.get(f"{FINAL_NORM}.weight").to(dtype))
    head = ckpt.get(LM_HEAD if LM_HEAD in ckpt.weight_map else EMBED_NAME).to(dtype)  # tied or not
    grads, top = ActivationList(store, "sens_grad", n), ActivationList(store, f"sens{num_layers}", n)
    for j, r in enumerate(rendered):
        h = top[j].clone().requires_grad_(True)
        rows = torch.nonzero(r.modality[1:] == response).flatten()  # positions predicting a response token
        g = torch.zeros_like(h)
        for r0 in range(0, rows.numel(), 512):  # logits chunked: the vocabulary is large
            sel = rows[r0 : r0 + 512]
            with torch.enable_grad():
                loss = F.cross_entropy(norm(h[sel]) @ head.T, r.input_ids[sel + 1], reduction="sum")
                g += torch.autograd.grad(loss, h)[0]
        grads[j] = g
    del head
    store.drop(f"sens{num_layers}")
    out = torch.zeros(num_layers, len(MODALITIES), dtype=torch.float64)
    counts = torch.zeros(len(MODALITIES), dtype=torch.float64)
    for r in rendered:
        counts += torch.bincount(r.modality.long(), minlength=len(MODALITIES)).double()
    for first in reversed(range(0, num_layers, k)):
        last = min(first + k, num_layers)
        forward(first, last - 1, 1)  # the inputs of every layer of this segment, from its checkpoint
        for i in reversed(range(first, last)):
            for j, r in enumerate(rendered):  # grads[j]: dL / d(output of layer i)
                sq = grads[j].double().pow(2).sum(-1)
                out[i] += torch.bincount(r.modality.long(), weights=sq, minlength=len(MODALITIES))
            if i > 0:
                layer = load_decoder_layer(ckpt, i, dtype).requires_grad_(False)
                acts = ActivationList(store, f"sens{i}", n)
                for j in range(n):
                    x = acts[j].clone().requires_grad_(True)
                    with torch.enable_grad():
                        y = layer(x[None], cos[: len(x)], sin[: len(x)])[0]
                        # a scalar vector-Jacobian product: grad_outputs= would import sympy (about a second)
                        grads[j] = torch.autograd.grad((y * grads[j]).sum(), x)[0]
                del layer
            store.drop(f"sens{i}")
            bar.update(1)
    store.drop("sens_grad")
    bar.close()
    return (out / counts.clamp(min=1)).float(), counts.float()
