"""Layer-by-layer activation capture: the data-movement half of calibration, AWQ and GPTQ-style search.

Images go through the vision tower (also one ViT layer at a time) and mlp1 once; their features overwrite
the token embeddings at the <IMG_CONTEXT> positions. Then, for each decoder layer: load that one layer
from the checkpoint, run every sample through it (recording linear-input statistics through hooks), hand
the layer with its inputs and outputs to the caller, and keep the outputs as the next layer's inputs.
Peak RAM is one layer plus the cached activations, and those spill to disk beyond the memory budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from r1v_quant.checkpoint import Checkpoint
from r1v_quant.llm import Qwen2Layer, rope_cos_sin
from r1v_quant.vision import Projector, VisionEmbeddings, VisionLayer, pixel_shuffle

from .dataset import CalibrationSet
from .render import RenderedSample, Renderer
from .stats import LayerStats
from .store import ActivationList, ActivationStore

EMBED_NAME = "language_model.model.embed_tokens.weight"


def load_decoder_layer(ckpt: Checkpoint, index: int, dtype: torch.dtype = torch.float32) -> Qwen2Layer:
    """One Qwen2 decoder layer with its checkpoint weights (nothing else of the LLM is loaded)."""
    with torch.device("meta"):
        layer = Qwen2Layer(ckpt.spec.llm)
    layer.load_state_dict(_cast(ckpt.layer(index), dtype), strict=True, assign=True)
    return layer.eval()


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
    with torch.device("meta"):
        embeddings = VisionEmbeddings(v)
    embeddings.load_state_dict(_cast(ckpt.with_prefix("vision_model.embeddings"), dtype), assign=True)
    for j in todo:
        hidden[j] = embeddings(renderer.pixels(rendered[j], cset).to(dtype))
        bar.update(1)
    del embeddings
    for i in range(depth):
        with torch.device("meta"):
            layer = VisionLayer(v)
        layer.load_state_dict(_cast(ckpt.layer(i, vision=True), dtype), strict=True, assign=True)
        for j in todo:
            hidden[j] = layer(hidden[j])  # samples are independent in the ViT: update in place
            bar.update(1)
        del layer
    with torch.device("meta"):
        proj = Projector(spec.projector_in, spec.llm.hidden_size)
    proj.load_state_dict(_cast(ckpt.with_prefix("mlp1"), dtype), strict=True, assign=True)
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
    inputs = ActivationList(store, "inputs", n)
    feats = image_features(ckpt, renderer, cset, rendered, store, dtype=dtype, progress=progress)
    embed_samples(ckpt, rendered, feats, inputs, dtype=dtype)
    longest = max((r.length for r in rendered), default=1)
    cos, sin = rope_cos_sin(ckpt.spec.llm, torch.arange(longest), dtype)
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
