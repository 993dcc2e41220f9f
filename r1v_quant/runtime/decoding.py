"""How `eval bench` decodes: the model's own sampling settings, k samples per item, a token budget.

Reasoning models are scored as they are meant to be run. By default the settings come from the
reference checkpoint's `generation_config.json` (do_sample, temperature, top_p, repetition_penalty); where
it states none (Skywork's own files carry only ids), from the flavour's published values below. Greedy
decoding is an option. Every model of a comparison decodes with the reference's settings and the same
seed per (item, sample), so the comparison stays paired.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from r1v_quant.util.errors import R1VError

DEFAULT_MAX_TOKENS = 32_768  # per answer; capped by the context each backend has


@dataclass(frozen=True)
class Published:
    temperature: float
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    source: str


# Skywork's inference script for every release (github SkyworkAI/Skywork-R1V,
# inference/inference_with_transformers.py) samples with these, with up to 64,000 new tokens.
_SKYWORK = Published(0.6, 0.95, 1.05, 64_000, "Skywork's published inference settings")
FLAVOR_SAMPLING: dict[str, Published] = {"r1v": _SKYWORK, "r1v2": _SKYWORK, "r1v3": _SKYWORK}


@dataclass(frozen=True)
class Decoding:
    temperature: float  # 0: greedy
    top_p: float
    repetition_penalty: float
    samples: int  # answers per item; accuracy is averaged over them
    seed: int
    max_tokens: int  # budget per answer before the context cap
    source: str  # where the sampling settings came from

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def seed_for(self, item_id: str, sample: int) -> int:
        """The seed of one (item, sample): the same for every model, independent of item order."""
        h = hashlib.blake2b(f"{self.seed}/{item_id}/{sample}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") & 0x7FFFFFFF

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "greedy": self.greedy}

    def label(self) -> str:
        how = (
            "greedy"
            if self.greedy
            else f"temperature {self.temperature:g}, top-p {self.top_p:g}, repetition penalty "
            f"{self.repetition_penalty:g}, {self.samples} sample(s) per item"
        )
        return f"{how} ({self.source}), at most {self.max_tokens} new tokens per answer"


def checkpoint_sampling(model_dir: Path | str, flavor: str | None) -> tuple[float, float, float, str]:
    """(temperature, top_p, repetition_penalty, source) the checkpoint is meant to be run with."""
    published = FLAVOR_SAMPLING.get(flavor or "")
    gen: dict[str, Any] = {}
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise R1VError(f"{path}: not readable JSON ({e})") from None
    states = any(k in gen for k in ("temperature", "top_p", "repetition_penalty", "do_sample"))
    if states:
        if gen.get("do_sample") is False:
            return 0.0, 1.0, float(gen.get("repetition_penalty", 1.0)), "generation_config.json (greedy)"
        base = published or Published(1.0, 1.0, 1.0, DEFAULT_MAX_TOKENS, "")
        return (
            float(gen.get("temperature", base.temperature)),
            float(gen.get("top_p", base.top_p)),
            float(gen.get("repetition_penalty", base.repetition_penalty)),
            "generation_config.json",
        )
    if published is None:
        raise R1VError(f"{model_dir}: no sampling settings in generation_config.json and no known flavour")
    return published.temperature, published.top_p, published.repetition_penalty, published.source


def resolve_decoding(
    model_dir: Path | str,
    flavor: str | None,
    *,
    greedy: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    samples: int = 1,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Decoding:
    """The reference's settings, with any given on the command line in their place."""
    if samples < 1:
        raise R1VError("--samples must be at least 1")
    if max_tokens < 1:
        raise R1VError("--max-tokens must be at least 1")
    if greedy:
        if samples != 1:
            raise R1VError("--greedy gives one answer per item: --samples must be 1")
        return Decoding(0.0, 1.0, 1.0, 1, seed, max_tokens, "greedy")
    t, p, r, source = checkpoint_sampling(model_dir, flavor)
    given = [x is not None for x in (temperature, top_p, repetition_penalty)]
    if any(given):
        source = f"{source}; {'set' if all(given) else 'partly set'} on the command line"
    t = t if temperature is None else temperature
    p = p if top_p is None else top_p
    r = r if repetition_penalty is None else repetition_penalty
    if t < 0 or not 0 < p <= 1 or r <= 0:
        raise R1VError(f"sampling settings out of range: temperature {t}, top-p {p}, repetition penalty {r}")
    if t == 0 and samples != 1:
        raise R1VError("temperature 0 is greedy: one answer per item, --samples must be 1")
    return Decoding(t, p, r, samples, seed, max_tokens, source)
