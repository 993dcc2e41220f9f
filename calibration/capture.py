"""Layer-by-layer activation capture: the data-movement half of calibration, AWQ and GPTQ-style search.

Images go through the vision tower (also one ViT layer at a time) and mlp1 once; their features overwrite
the token embeddings at the <IMG_CONTEXT> positions. Then, for each decoder layer: load that one layer
from the checkpoint, run every sample through it (recording linear-input statistics through hooks), hand
the layer with its inputs and outputs to the caller, and keep the outputs as the next layer's inputs.
Peak RAM is one layer plus the cached activations, and those spill to disk beyond the memory budget.

`device`: where the layers run. Each streamed layer (ViT layer, decoder layer, the lm_head) is put on it
while it is used, each sample's activations go there for the computation and come back to the host
before entering the store (the store and its spill stay host-side, dtypes unchanged). On the CPU every
move is a no-op (`.to()` returns the same tensor), so CPU results are unchanged to the byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from r1v_quant.calibration.dataset import CalibrationSet
from r1v_quant.calibration.render import MODALITIES, RenderedSample, Renderer
from r1v_quant.calibration.schedule import Forward, Head, layers_run, sensitivity_schedule
from r1v_quant.calibration.stats import LayerStats
from r1v_quant.calibration.store import ActivationList, ActivationStore
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.llm import Qwen2Layer, rope_cos_sin
from r1v_quant.model.norms import RMSNorm
from r1v_quant.model.vision import Projector, VisionEmbeddings, VisionLayer, pixel_shuffle

EMBED_NAME = "language_model.model.embed_tokens.weight"
FINAL_NORM = "language_model.model.norm"
LM_HEAD = "language_model.lm_head.weight"

M = TypeVar("M", bound=torch.nn.Module)
Device = torch.device | str
CPU = torch.device("cpu")


def _loaded(
    build: Callable[[], M], state: dict[str, torch.Tensor], dtype: torch.dtype, device: Device = CPU
) -> M:
    """`build()` on the meta device, then given the checkpoint tensors: no random init, no second copy.
    Each tensor is cast on its way to `device`, so the host never holds the layer at the compute dtype."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(_cast(state, dtype, device), strict=True, assign=True)
    return module


def load_decoder_layer(
    ckpt: Checkpoint, index: int, dtype: torch.dtype = torch.float32, device: Device = CPU
) -> Qwen2Layer:
    """One Qwen2 decoder layer with its checkpoint weights (nothing else of the LLM is loaded)."""
    return _loaded(lambda: Qwen2Layer(ckpt.spec.llm), ckpt.layer(index), dtype, device).eval()


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _release(module: torch.nn.Module) -> None:
    """Free a finished layer's device memory even while a caller still holds it (valid until the next
    layer, as documented); on the CPU it is left alone (freed when the last reference goes)."""
    if _device_of(module).type != "cpu":
        module.to("meta")


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
        """(n, hidden) -> (n, hidden) through `layer` (default: this layer, maybe modified by the caller),
        on the layer's device (the result stays there)."""
        layer = layer or self.layer
        dev = _device_of(layer)
        cos, sin = self.rope(x.shape[0])
        return layer(x[None].to(dev, self._cos.dtype), cos.to(dev), sin.to(dev))[0]

    def recompute_outputs(self) -> None:
        """Re-run the (e.g. quantized) layer so the next layer sees its outputs instead of the 16-bit ones."""
        for j in range(len(self.inputs)):
            self.outputs[j] = self.run(self.inputs[j]).cpu()


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
    device: Device = CPU,
) -> ActivationList:
    """Per sample with images: (tiles·256, hidden) mlp1 outputs, the ViT run one layer at a time.

    Same math as `extract_feature`, but only one ViT layer is in memory (InternViT-6B is 5.5 B parameters)
    and the per-tile hidden states live in the store, so they spill under a budget like everything else.
    Each layer runs on `device`, one sample's tiles at a time; the store keeps host copies.
    """
    spec, v = ckpt.spec, ckpt.spec.vision
    feats = ActivationList(store, "image_features", len(rendered))
    todo = [j for j, r in enumerate(rendered) if r.image_keys]
    if not todo:
        return feats
    hidden = ActivationList(store, "vit_hidden", len(rendered))
    depth = spec.select_layer % (v.num_layers + 1)  # hidden_states[select_layer]; index 0 = embeddings
    bar = tqdm(total=(depth + 2) * len(todo), desc="vision tower", unit="sample", disable=not progress)
    embeddings = _loaded(
        lambda: VisionEmbeddings(v), ckpt.with_prefix("vision_model.embeddings"), dtype, device
    )
    for j in todo:
        hidden[j] = embeddings(renderer.pixels(rendered[j], cset).to(device, dtype)).cpu()
        bar.update(1)
    del embeddings
    for i in range(depth):
        layer = _loaded(lambda: VisionLayer(v), ckpt.layer(i, vision=True), dtype, device)
        for j in todo:
            # samples are independent in the ViT: update in place
            hidden[j] = layer(hidden[j].to(device)).cpu()
            bar.update(1)
        del layer
    proj = _loaded(
        lambda: Projector(spec.projector_in, spec.llm.hidden_size), ckpt.with_prefix("mlp1"), dtype, device
    )
    for j in todo:
        x = hidden[j].to(device)[:, 1:, :]  # drop CLS
        n, t, c = x.shape
        side = int(t**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, c), spec.downsample_ratio, spec.ps_version)
        feats[j] = proj(x.reshape(n, -1, x.shape[-1])).reshape(-1, spec.llm.hidden_size).cpu()
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
    """Token embeddings with image features written over every <IMG_CONTEXT> (as R1VModel.embed).

    Host-side on every device: a gather and a copy, no arithmetic, and the table (1.5 GB at 38B) would
    cost more to move than the lookup does."""
    table = ckpt.get(EMBED_NAME)  # the one non-layer LLM tensor needed (1.5 GB for 38B); freed below
    ctx = ckpt.spec.tokens.img_context
    for j, rs in enumerate(rendered):
        emb = table[rs.input_ids].to(dtype)
        if rs.image_keys:
            emb[rs.input_ids == ctx] = feats[j].to(dtype)
            feats.store.delete(feats.name, j)
        out[j] = emb
    del table


def _cast(
    state: dict[str, torch.Tensor], dtype: torch.dtype, device: Device = CPU
) -> dict[str, torch.Tensor]:
    return {k: t.to(device, dtype) for k, t in state.items()}


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
    device: Device,
) -> tuple[ActivationList, torch.Tensor, torch.Tensor]:
    """The first decoder layer's inputs (embeddings + image features) as `name` in `store` (host), and the
    RoPE cos/sin for the longest sample on `device`: what every layer-by-layer pass starts from."""
    inputs = ActivationList(store, name, len(rendered))
    feats = image_features(
        ckpt, renderer, cset, rendered, store, dtype=dtype, progress=progress, device=device
    )
    embed_samples(ckpt, rendered, feats, inputs, dtype=dtype)
    longest = max((r.length for r in rendered), default=1)
    cos, sin = rope_cos_sin(ckpt.spec.llm, torch.arange(longest), dtype)
    return inputs, cos.to(device), sin.to(device)


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
    device: Device = CPU,
) -> Iterator[LayerCapture]:
    """Yield a LayerCapture per decoder layer, in order. Between yields the previous layer is freed.

    A consumer may modify `capture.layer` in place (scale, quantize) and call `recompute_outputs()` to
    propagate the modified layer's outputs; otherwise the next layer sees the 16-bit outputs.
    `device`: where the layer runs (`capture.layer` is yielded there, its stats on the CPU; inputs and
    outputs are host-side lists).
    """
    n = len(rendered)
    inputs, cos, sin = _first_inputs(
        ckpt, renderer, cset, rendered, store, "inputs", dtype=dtype, progress=progress, device=device
    )
    masks = [r.modality for r in rendered]
    num_layers = ckpt.spec.llm.num_layers
    bar = tqdm(total=num_layers * n, desc="decoder layers", unit="sample", disable=not progress)
    try:
        for i in range(num_layers):
            bar.set_postfix(layer=i)
            layer = load_decoder_layer(ckpt, i, dtype, device)
            outputs = ActivationList(store, "outputs", n)
            stats = LayerStats.for_layer(i, layer) if collect_stats else None
            if stats:
                stats.to(device)
            current: list[torch.Tensor] = [masks[0].to(device)] if masks else []
            hooks = stats.hooks(layer, current) if stats else contextlib.nullcontext()
            cap = LayerCapture(i, layer, inputs, outputs, masks, stats, cos, sin)
            with hooks:
                for j in range(n):
                    current[0] = masks[j].to(device)
                    outputs[j] = cap.run(inputs[j]).cpu()
                    bar.update(1)
            if stats:
                stats.to(CPU)
            yield cap
            store.drop("inputs")
            store.rename("outputs", "inputs")  # outputs become the next layer's inputs, no copy
            _release(cap.layer)  # the caller's `cap` lives until the next yield: not two layers on a GPU
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
    device: Device = CPU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((decoder layers, 3), (3,)): per layer and modality code, the mean over such tokens of |dL/dh|², h
    the layer's output and L the summed cross-entropy of the response tokens; and the token counts.

    MBQ's modality sensitivity (squared: the Fisher estimate of what an output error on such a token costs
    the answer). Streamed like `iter_layers`, one layer resident at a time: the forward pass keeps the
    inputs of every k-th layer (k ~ sqrt(layers)) in `store`, and the backward pass, from the top, re-runs
    each segment of k layers from its checkpoint before back-propagating through it: about 2·sqrt(layers)
    cached copies of the samples' activations, and each layer loaded three times.
    `device`: where layers, the lm_head and gradients are computed (one layer resident there, one sample at
    a time); cached activations and gradients stay in the host-side store; results returned on the CPU.
    """
    n, spec = len(rendered), ckpt.spec
    num_layers, response = spec.llm.num_layers, MODALITIES.index("response")
    steps = sensitivity_schedule(num_layers)
    _, cos, sin = _first_inputs(
        ckpt, renderer, cset, rendered, store, "sens0", dtype=dtype, progress=False, device=device
    )
    bar = tqdm(total=layers_run(steps), desc="sensitivity", unit="layer", disable=not progress)
    out = torch.zeros(num_layers, len(MODALITIES), dtype=torch.float64, device=device)
    counts = torch.zeros(len(MODALITIES), dtype=torch.float64)
    for r in rendered:
        counts += torch.bincount(r.modality.long(), minlength=len(MODALITIES)).double()
    grads = ActivationList(store, "sens_grad", n)

    def forward(step: Forward) -> None:
        for i, drop_input in step.layers():
            layer = load_decoder_layer(ckpt, i, dtype, device)
            src = ActivationList(store, f"sens{i}", n)
            dst = ActivationList(store, f"sens{i + 1}", n)
            for j in range(n):
                x = src[j].to(device)
                dst[j] = layer(x[None], cos[: len(x)], sin[: len(x)])[0].cpu()
            if drop_input:
                store.drop(f"sens{i}")
            bar.update(1)
            del layer

    def head() -> None:
        norm = RMSNorm(spec.llm.hidden_size, spec.llm.rms_eps)
        norm.weight.copy_(ckpt.get(f"{FINAL_NORM}.weight").to(dtype))
        norm.to(device)
        # tied or not; cast on the way to the device (the host holds only the 16-bit source)
        head = ckpt.get(LM_HEAD if LM_HEAD in ckpt.weight_map else EMBED_NAME).to(device, dtype)
        top = ActivationList(store, f"sens{num_layers}", n)
        for j, r in enumerate(rendered):
            h = top[j].to(device).clone().requires_grad_(True)
            mod, ids = r.modality.to(device), r.input_ids.to(device)
            rows = torch.nonzero(mod[1:] == response).flatten()  # positions predicting a response token
            g = torch.zeros_like(h)
            for r0 in range(0, rows.numel(), 512):  # logits chunked: the vocabulary is large
                sel = rows[r0 : r0 + 512]
                with torch.enable_grad():
                    loss = F.cross_entropy(norm(h[sel]) @ head.T, ids[sel + 1], reduction="sum")
                    g += torch.autograd.grad(loss, h)[0]
            grads[j] = g.cpu()
        del head
        store.drop(f"sens{num_layers}")

    def backward(i: int) -> None:
        for j, r in enumerate(rendered):  # grads[j]: dL / d(output of layer i)
            sq = grads[j].to(device).double().pow(2).sum(-1)
            codes = r.modality.to(device).long()
            out[i] += torch.bincount(codes, weights=sq, minlength=len(MODALITIES))
        if i > 0:
            layer = load_decoder_layer(ckpt, i, dtype, device).requires_grad_(False)
            acts = ActivationList(store, f"sens{i}", n)
            for j in range(n):
                x = acts[j].to(device).clone().requires_grad_(True)
                with torch.enable_grad():
                    y = layer(x[None], cos[: len(x)], sin[: len(x)])[0]
                    # a scalar vector-Jacobian product: grad_outputs= would import sympy (about a second)
                    gy = grads[j].to(device)
                    grads[j] = torch.autograd.grad((y * gy).sum(), x)[0].cpu()
            del layer
        store.drop(f"sens{i}")
        bar.update(1)

    for step in steps:
        if isinstance(step, Forward):
            forward(step)
        elif isinstance(step, Head):
            head()
        else:
            backward(step.layer)
    store.drop("sens_grad")
    bar.close()
    return (out.cpu() / counts.clamp(min=1)).float(), counts.float()
