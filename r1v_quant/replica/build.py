"""The built-in tiny Skywork-R1V replica: real config keys, tensor names, tokenizer rules and templates.

Widths are small (ViT 128, LLM 256) but chosen so that AWQ's 128-groups and llama.cpp's 256-blocks divide
every linear input, the LLM uses GQA (4 query heads on 2 KV heads) and a tile is still 448 px -> 256 tokens.

The weights behave like a trained model because they are one: the vision tower, mlp1 and the LLM are
trained together on generated problems (text reasoning, and questions whose answer is only in a rendered
picture) until held-out accuracy passes a threshold (r1v_quant.replica.train); the build is refused otherwise.
Then, as real LLMs show, a few channels are made
outliers without changing the function: those channels of both RMSNorm weights are multiplied by 50 and
the matching input columns of q/k/v/gate/up divided by 50. The 16-bit outputs stay the same, but every
quantized linear now sees outlier input channels (what makes plain rounding lose on real LLMs, and
what AWQ exists for).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from r1v_quant.data.synthdata import image_problems, text_problems
from r1v_quant.model.checkpoint import ShardedWriter
from r1v_quant.model.reference import R1VModel
from r1v_quant.model.spec import FLAVORS, TokenIds, parse_config
from r1v_quant.replica.train import Encoder, Skills, train_to_skill
from r1v_quant.util.atomic import atomic_dir
from r1v_quant.util.errors import R1VError

VIT_VARIANTS = ("rms", "layernorm")
OUTLIER_SCALE = 50.0
NUM_OUTLIERS = 4
IMAGE_EVERY = 2  # every other training step is an image question


@dataclass(frozen=True)
class TinyOptions:
    flavor: str = "r1v"
    vit: str = "layernorm"
    seed: int = 0
    steps: int = 3000  # the step cap; 0 = untrained (random weights, for layout and parity tests)
    min_accuracy: float = 0.9  # held-out image and text accuracy to reach; 0 = train exactly `steps`
    vocab_size: int = 2048
    llm_layers: int = 4
    outliers: bool = True


def tiny_config(
    flavor: str, vit: str, *, vocab_size: int, bos: int | None, eos: int | None, llm_layers: int = 4
) -> dict:
    """config.json with every key of a real R1V checkpoint, at tiny sizes."""
    rms = vit == "rms"
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "patch_size": 14,
        "image_size": 448,
        "num_channels": 3,
        "qkv_bias": not rms,
        "qk_normalization": rms,
        "norm_type": "rms_norm" if rms else "layer_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
        "torch_dtype": "bfloat16",
    }
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": llm_layers,
        "max_window_layers": llm_layers,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    cfg = {
        "architectures": ["SkyworkR1VChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
            "AutoModel": "modeling_skywork_chat.SkyworkChatModel",
            "AutoModelForCausalLM": "modeling_skywork_chat.SkyworkChatModel",
        },
        "model_type": "skywork_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "hidden_size": 256,
        "select_layer": -1,
        "ps_version": "v2",
        "template": FLAVORS[flavor].template_names[0],
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "vision_config": vision,
        "llm_config": llm,
    }
    if flavor == "r1v3":
        cfg.update({"freeze_adapter": False, "freeze_llm": False, "freeze_vision": False})
    return cfg


PREPROCESSOR_CONFIG = {
    "crop_size": 448,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 448,
}

# Remote-code stand-in: real checkpoints ship such .py files for `trust_remote_code`. r1v-quant never
# imports them; the exporters copy them unchanged, so the replica carries one to exercise that path.
REMOTE_CODE = '''"""Configuration for SkyworkChatModel (tiny replica; r1v-quant never runs it)."""
from transformers import PretrainedConfig


class SkyworkChatConfig(PretrainedConfig):
    model_type = "skywork_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = vision_config or {}
        self.llm_config = llm_config or {}
'''


def _corpus(seed: int) -> list[str]:
    from r1v_quant.model.tiny_tokenizer import tiny_corpus_extra

    texts = [f"{p.question}\n{p.response()}" for p in text_problems(3000, seed + 1)]
    texts += [f"{p.question}\n{p.response()}" for p in image_problems(600, seed + 2)]
    return texts + tiny_corpus_extra()


def _grid_positions(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position codes (grid*grid, dim), as MAE initialises ViTs: every patch starts out
    knowing its row and column, so spatial questions are learnable in a short run."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 4) / (dim // 4))
    x, y = xs.flatten()[:, None] * freqs, ys.flatten()[:, None] * freqs
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _init_weights(model: R1VModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("position_embedding"):
            with torch.no_grad():
                p.normal_(0.0, 0.02, generator=g)
                v = model.spec.vision
                p[0, 1:] += 2.0 * _grid_positions(v.grid, v.hidden_size)
        elif name.endswith("patch_embedding.weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                for c in range(3):  # the first three features start as the patch's mean R, G and B
                    p[c].zero_()
                    p[c, c] = 3.0 / p[c, c].numel()
        elif name.endswith(("ls1", "ls2")):
            torch.nn.init.constant_(p, 0.1)  # InternViT initializer_factor
        elif "norm" in name or name.startswith("mlp1.0"):
            torch.nn.init.constant_(p, 0.0 if name.endswith("bias") else 1.0)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@torch.no_grad()
def add_outlier_channels(model: R1VModel, channels: list[int], scale: float = OUTLIER_SCALE) -> None:
    """Function-preserving outliers: norm weight x scale on `channels`, consuming input columns / scale."""
    for layer in model.language_model.model.layers:
        layer.input_layernorm.weight[channels] *= scale
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.weight[:, channels] /= scale
        layer.post_attention_layernorm.weight[channels] *= scale
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight[:, channels] /= scale


def as_saved(model: R1VModel, channels: list[int]) -> R1VModel:
    """A copy of `model` as `build_tiny` writes it: outlier channels added, weights rounded to bf16."""
    out = copy.deepcopy(model)
    if channels:
        add_outlier_channels(out, channels)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return out


def skills_line(s: Skills) -> str:
    failed = s.probes_failed
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    probes = f"; probe questions failed: {', '.join(failed[:3])}{more}" if failed else ""
    return f"held-out image {s.image:.0%}, text {s.text:.0%}{probes}"


def build_tiny(
    out: Path | str, opts: TinyOptions = TinyOptions(), progress: Callable[[int, float], None] | None = None
) -> dict:
    """Write a complete tiny checkpoint directory atomically; returns a small build report."""
    from r1v_quant.model.prompts import CHAT_FORMATS
    from r1v_quant.model.tiny_tokenizer import build_tiny_tokenizer
    from r1v_quant.model.tokenizer import R1VTokenizer

    if opts.flavor not in FLAVORS:
        raise R1VError(f"unknown flavour {opts.flavor!r}: expected one of {', '.join(FLAVORS)}")
    if opts.vit not in VIT_VARIANTS:
        raise R1VError(f"unknown --vit {opts.vit!r}: expected rms or layernorm")
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(opts.seed)
    with atomic_dir(out) as tmp:
        build_tiny_tokenizer(tmp, opts.flavor, _corpus(opts.seed), vocab_size=opts.vocab_size)
        tok = R1VTokenizer.from_dir(tmp)
        fmt = CHAT_FORMATS[opts.flavor]
        bos = tok.token_to_id(tok.bos_token) if tok.bos_token else tok.token_to_id("<|endoftext|>")
        eos = tok.token_to_id(fmt.stop_tokens[0])
        cfg = tiny_config(
            opts.flavor, opts.vit, vocab_size=len(tok), bos=bos, eos=eos, llm_layers=opts.llm_layers
        )
        tokens = TokenIds(
            tok.img_context_id, tok.img_start_id, tok.img_end_id, tok.think_start_id, tok.think_end_id
        )
        spec = parse_config(cfg, flavor=opts.flavor, tokens=tokens)
        model = R1VModel(spec)
        _init_weights(model, opts.seed)
        g = random.Random(opts.seed)
        channels = sorted(g.sample(range(spec.llm.hidden_size), NUM_OUTLIERS)) if opts.outliers else []
        result = None
        if opts.steps:
            enc = Encoder(tmp, opts.flavor, spec.num_image_token)
            result = train_to_skill(
                model,
                enc,
                max_steps=opts.steps,
                min_accuracy=opts.min_accuracy,
                seed=opts.seed,
                progress=progress,
                as_saved=lambda m: as_saved(m, channels),
            )
            if not result.reached:
                raise R1VError(
                    f"training stopped at the {opts.steps}-step cap below --min-accuracy "
                    f"{opts.min_accuracy:.0%}: {skills_line(result.skills)}"
                )
        losses = result.losses if result else []
        if channels:
            add_outlier_channels(model, channels)

        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {
            "_from_model_config": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "transformers_version": "4.37.2",
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
        (tmp / "configuration_skywork_chat.py").write_text(REMOTE_CODE)
        state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        total = sum(v.numel() * 2 for v in state.values())
        writer = ShardedWriter(tmp, max_shard_bytes=total // 3 + 1)
        for name in spec.tensor_shapes():  # checkpoint order: vision, mlp1, embeddings, layers, norm, lm_head
            writer.add(name, state[name])
        writer.close()
        report = {
            "flavor": opts.flavor,
            "vit": opts.vit,
            "seed": opts.seed,
            "steps": opts.steps,
            "vocab": len(tok),
            "outlier_channels": channels,
            "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "steps_trained": result.steps if result else 0,
            "min_accuracy": opts.min_accuracy if opts.steps else None,
            "heldout": result.skills.as_dict() if result else None,
            "history": result.history if result else [],
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1),  # all threads: less sensitive to other load
            "seconds_training": result.seconds if result else {},
        }
        (tmp / "tiny_build.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_random_checkpoint(
    out: Path | str, cfg: dict, *, seed: int = 0, shard_bytes: int = 256 * 1024**2
) -> Path:
    """Weights-only checkpoint (config + shards, no tokenizer) with random bf16 tensors of the spec's shapes.

    For memory and speed benchmarks at sizes the trained replica does not have; tensors are generated one
    at a time and at most one shard is held before it is written.
    """
    spec = parse_config(cfg, flavor="r1v")
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        writer = ShardedWriter(tmp, max_shard_bytes=shard_bytes)
        for name, shape in spec.tensor_shapes().items():
            if name.endswith(("norm.weight", "ls1", "ls2")) or name == "mlp1.0.weight":
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g) * 0.02
            writer.add(name, t.to(torch.bfloat16))
        writer.close()
    return Path(out)
