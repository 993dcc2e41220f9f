"""The whole R1V model in torch (reference forward): vision tower -> mlp1 -> embeddings merge -> Qwen2.

No remote code, no pickle: weights come from `Checkpoint` (safetensors), the graph from `ModelSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from r1v_quant.model.checkpoint import Checkpoint, open_checkpoint
from r1v_quant.model.llm import KVCache, Qwen2ForCausalLM
from r1v_quant.model.spec import ModelSpec
from r1v_quant.model.vision import Projector, VisionModel, extract_feature
from r1v_quant.util.errors import R1VError


class R1VModel(nn.Module):
    """Module tree and parameter names as in the checkpoint (`vision_model`, `mlp1`, `language_model`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.vision_model = VisionModel(spec.vision)
        self.mlp1 = Projector(spec.projector_in, spec.llm.hidden_size)
        self.language_model = Qwen2ForCausalLM(spec.llm)

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint | Path | str,
        *,
        dtype: torch.dtype = torch.float32,
        flavor: str | None = None,
        device: torch.device | str = "cpu",
    ) -> R1VModel:
        """The whole model on `device`, read one tensor at a time (host RAM holds one tensor in flight
        when `device` is a GPU). The quantization jobs stream layers instead and never call this."""
        if not isinstance(ckpt, Checkpoint):
            ckpt = open_checkpoint(ckpt, flavor=flavor)
        quant = ckpt.spec.quantization
        if quant is not None:
            if quant.get("quant_method") != "awq" or quant.get("version", "gemm") != "gemm":
                raise R1VError(f"{ckpt.path}: unsupported quantization {quant.get('quant_method')!r}")
            # the packed format belongs to the exporter; the core only asks it for dequantized weights
            from r1v_quant.model.awq_layout import awq_state_dict

            state = awq_state_dict(ckpt, dtype, device)
        else:
            # the spec's names: validate() allows ignorable buffers (rotary inv_freq) beside them
            names = ckpt.spec.tensor_shapes()
            state = {name: ckpt.get(name).to(device=device, dtype=dtype) for name in names}
        with torch.device("meta"):
            model = cls(ckpt.spec)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    # -- forward -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return extract_feature(self.vision_model, self.mlp1, self.spec, pixel_values)

    @torch.no_grad()
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the projected image features written over every <IMG_CONTEXT> position."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        ctx = self.spec.tokens.img_context
        n_ctx = 0 if ctx is None else int((input_ids == ctx).sum())
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.image_embeds(pixel_values)
        if image_embeds is None:
            if n_ctx:
                raise R1VError(f"prompt has {n_ctx} <IMG_CONTEXT> tokens but no image was given")
            return embeds
        flat = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if n_ctx != flat.shape[0]:
            raise R1VError(
                f"prompt has {n_ctx} <IMG_CONTEXT> tokens but the images give {flat.shape[0]} embeddings"
            )
        embeds = embeds.clone()
        embeds[input_ids == ctx] = flat
        return embeds

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids (b, n) -> float32 logits (b, n, vocab)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.logits(self.language_model.forward_embeds(embeds, cache))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] = (),
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Greedy decoding with a KV cache; stops at any of `stop_ids` (kept out of the result)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        cache = KVCache(self.spec.llm.num_layers)
        lm = self.language_model
        hidden = lm.forward_embeds(self.embed(input_ids, pixel_values), cache)
        out: list[int] = []
        stopped = False
        for _ in range(max_new_tokens):
            nxt = int(lm.logits(hidden[:, -1]).argmax(-1)[0])
            if nxt in stop_ids:
                stopped = True
                break
            out.append(nxt)
            if on_token:
                on_token(nxt)
            emb = lm.model.embed_tokens(torch.tensor([[nxt]]))
            hidden = lm.forward_embeds(emb, cache)
        return GenerationResult(out, stopped)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # False: the max_new_tokens budget cut the answer off


def build_inputs(
    model_dir: Path | str,
    spec: ModelSpec,
    question: str,
    images: Sequence[str | Path] = (),
    *,
    system: str | None = None,
    think: bool = True,
    max_tiles: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Prompt in the flavour's template with each `<image>` expanded to its tiles' <IMG_CONTEXT> run
    (`max_tiles` overrides the checkpoint's tile cap)."""
    from r1v_quant.model.preprocess import preprocess_for_spec
    from r1v_quant.model.prompts import build_prompt, expand_image_tokens
    from r1v_quant.model.tokenizer import R1VTokenizer

    tok = R1VTokenizer.from_dir(model_dir)
    prepped = [preprocess_for_spec(p, spec, max_tiles) for p in images]
    if images and "<image>" not in question:
        question = "<image>\n" * len(images) + question
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    text = build_prompt(spec.flavor, messages, think=think)
    text = expand_image_tokens(text, [p.num_tiles for p in prepped], spec.num_image_token)
    ids = torch.tensor([tok.encode(text)])
    pixels = torch.cat([p.pixel_values for p in prepped]) if prepped else None
    return ids, pixels, text
