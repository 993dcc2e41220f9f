"""Training the tiny replica to a verified skill: vision tower, mlp1 and LLM together, until held-out
accuracy on image questions and text problems reaches a threshold (or a step cap is hit).

Every batch is freshly generated (no example is seen twice), so the held-out sets measure skill, not
memory. Held-out accuracy is measured the way the model is used: greedy decoding from the prompt (items
with prompts of equal length decoded together, one KV cache), the answer after the last `</think>` graded
like `eval bench` grades it, on the weights exactly as they are written (averaged, outlier channels
constructed, rounded to bf16). On top of the held-out sets, the probe pictures (each colour x shape,
centred, the picture the demo and the tests ask about) must all be named correctly, colour and shape.

Which float kernels a CPU uses (AVX2 vs AVX-512, thread count) changes the trained bytes; training to a
measured skill with margin, rather than for a fixed number of steps, is what makes the replica answer the
same questions correctly on every machine.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from r1v_quant.data.synthdata import (
    COLORS,
    IMAGE_TASKS,
    SCENE_MAKERS,
    SHAPES,
    ImageProblem,
    Scene,
    image_problems,
    probe_problems,
    scene_problems,
    scenes,
    text_problems,
)
from r1v_quant.model.reference import R1VModel

EVAL_SEED = 77_001  # held-out items: differs from every seed the training draws from
EVAL_IMAGE_PER_TASK = 8
EVAL_TEXT = 48
TEXT_BATCH = 16
SCENES_PER_STEP = 4
IMAGE_EVERY = 2  # after the text-only start, every other step is an image step
TEXT_FIRST = 150  # text-only steps first: cheap, and they teach the answer format and copying
LR = {"llm": 1e-3, "mlp1": 3e-3, "vision": 2e-3}
WARMUP = 30
LR_HORIZON = 600  # steps over which the learning rate falls to LR_FLOOR of its peak
LR_FLOOR = 0.1
MAX_NEW = 96  # held-out answers are far shorter; a model that rambles past this is wrong
FULL = False
AUX_WEIGHT = 1.0
EMA_DECAY = 0.98
# a check decodes greedily once at most this many probes' words are not named (teacher forcing is a loose
# proxy: a replica whose greedy answers were all right named 22 of the 24)
GATE_SLACK = 6


@dataclass
class Sequence:
    ids: list[int]
    loss_from: int  # the first position whose token is trained on (the response)
    image: int = -1  # index of the scene in the batch, -1 for text


class Encoder:
    """Prompt + response -> token ids in the flavour's template, with the image expanded to its tiles."""

    def __init__(self, model_dir: Path, flavor: str, num_image_token: int):
        from r1v_quant.model.prompts import CHAT_FORMATS, build_prompt, image_placeholder
        from r1v_quant.model.tokenizer import R1VTokenizer

        self.tok = R1VTokenizer.from_dir(model_dir)
        self.stop = CHAT_FORMATS[flavor].stop_tokens[0]
        self.pad = self.tok.token_to_id(self.stop)
        self.flavor, self.build_prompt = flavor, build_prompt
        self.placeholder = image_placeholder(1, num_image_token)

    def encode(self, question: str, response: str, image: int = -1) -> Sequence:
        if image >= 0:
            question = f"{self.placeholder}\n{question}"
        prompt = self.build_prompt(self.flavor, [{"role": "user", "content": question}])
        p = self.tok.encode(prompt)
        return Sequence(p + self.tok.encode(response + self.stop), len(p), image)


def _pixels(pictures: list) -> torch.Tensor:
    """Pixel values of anything with a `render()` (an ImageProblem, a Scene), one tile each."""
    from r1v_quant.model.preprocess import preprocess_image

    return torch.cat([preprocess_image(p.render()).pixel_values for p in pictures])


def _padded(seqs: list[Sequence], start: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids from position `start` on, right-padded, and where each row's scored positions are (position
    i predicts token i + 1; the response's tokens are scored)."""
    n = max(len(s.ids) for s in seqs) - start
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    scored = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids) - start] = torch.tensor(s.ids[start:])
        scored[i, s.loss_from - 1 - start : len(s.ids) - 1 - start] = True
    return ids, scored[:, :-1]


def shared_prefix(seqs: list[Sequence]) -> int:
    """Length of the prompt prefix every sequence has in common (ends before the first scored position).

    Image prompts put the picture first, so every question of a batch shares the prefix that holds the
    picture's tokens; only the embeddings of the image tokens differ, per picture."""
    first = seqs[0].ids
    n = min(s.loss_from for s in seqs) - 1
    for s in seqs[1:]:
        n = next((i for i in range(n) if s.ids[i] != first[i]), n)
    return n


def _forward(
    model: R1VModel, seqs: list[Sequence], pixels: torch.Tensor | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits at the scored positions, their target tokens, and the image features (None for text).

    Image batches run the shared prefix (the prompt up to and past the picture, whose `<IMG_CONTEXT>`
    embeddings come from the trainable vision path) once per picture and let every question about that
    picture continue from its keys and values: the same function as one padded pass over every sequence,
    at the cost of one pass over each picture's tokens. Logits are computed only where a token is scored.
    """
    from r1v_quant.model.llm import KVCache
    from r1v_quant.model.vision import extract_feature

    lm = model.language_model
    feats, cache, start = None, None, 0
    if pixels is not None:
        feats = extract_feature(model.vision_model, model.mlp1, model.spec, pixels)
        start = shared_prefix(seqs)
        prefix = torch.tensor([seqs[0].ids[:start]] * len(feats))
        ctx = prefix == model.spec.tokens.img_context
        if int(ctx.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError("the image tokens of an image batch must lie in the prompt prefix it shares")
        emb = lm.model.embed_tokens(prefix)
        emb = emb.masked_scatter(ctx[..., None], feats.to(emb.dtype))
        cache = KVCache(model.spec.llm.num_layers)
        lm.forward_embeds(emb, cache)
        rows = torch.tensor([s.image for s in seqs])  # each question continues from its picture's prefix
        cache.k = [k.index_select(0, rows) for k in cache.k]
        cache.v = [v.index_select(0, rows) for v in cache.v]
    ids, scored = _padded(seqs, start, pad)
    hidden = lm.forward_embeds(lm.model.embed_tokens(ids), cache)
    return lm.logits(hidden[:, :-1][scored]), ids[:, 1:][scored], feats


class SceneProbe(torch.nn.Module):
    """Training-only readout: linear heads on the image tokens' mean predict what the scene holds.

    The mean over tokens is what an attention head that has not learned where to look reads, so this
    auxiliary loss shapes image tokens the language model can use early in training; the heads are
    discarded afterwards (nothing of them is in the checkpoint).
    """

    def __init__(self, width: int):
        super().__init__()
        self.labels = {"kind": list(SCENE_MAKERS), "color": list(COLORS), "shape": list(SHAPES),
                       "second": list(COLORS)}  # fmt: skip
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in self.labels.items()})

    def _targets(self, sc: Scene) -> dict[str, int]:
        first = sc.items[0]
        t = {"kind": self.labels["kind"].index(sc.kind), "color": self.labels["color"].index(first.color),
             "shape": self.labels["shape"].index(first.shape)}  # fmt: skip
        if sc.kind == "pair":
            t["second"] = self.labels["second"].index(sc.items[1].color)
        return t

    def loss(self, feats: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
        pooled = feats.mean(1)
        targets = [self._targets(s) for s in scenes]
        total = feats.new_zeros(())
        for k, head in self.heads.items():
            rows = [i for i, t in enumerate(targets) if k in t]
            if rows:
                y = torch.tensor([targets[i][k] for i in rows])
                total = total + F.cross_entropy(head(pooled[rows]), y)
        return total


@dataclass
class Skills:
    image: float
    text: float
    per_task: dict[str, float]
    probes_failed: list[str] = field(default_factory=list)

    def reached(self, threshold: float) -> bool:
        return not self.probes_failed and min(self.image, self.text) >= threshold

    def as_dict(self) -> dict:
        measured = not math.isnan(self.image)  # nan: held-out sets skipped (a probe failed first)
        return {"image": round(self.image, 4) if measured else None,
                "text": round(self.text, 4) if measured else None,
                "per_task": {k: round(v, 4) for k, v in self.per_task.items()},
                "probes_failed": self.probes_failed}  # fmt: skip


class HeldOut:
    """Held-out items the training never draws: EVAL_IMAGE_PER_TASK per image task, EVAL_TEXT text."""

    def __init__(self, enc: Encoder, seed: int = EVAL_SEED):
        self.enc = enc
        self.images = image_problems(EVAL_IMAGE_PER_TASK * len(IMAGE_TASKS), seed)
        self.pixels = _pixels(self.images)
        self.image_seqs = [enc.encode(p.question, p.response(), i) for i, p in enumerate(self.images)]
        self.texts = text_problems(EVAL_TEXT, seed + 1)
        self.text_seqs = [enc.encode(p.question, p.response()) for p in self.texts]
        self.probes = probe_problems()
        pictures = list(dict.fromkeys(p.scene for p in self.probes))  # two questions per picture
        self.probe_pixels = _pixels(pictures)
        self.probe_seqs = [enc.encode(p.question, p.response(), pictures.index(p.scene)) for p in self.probes]
        self.probe_words = [
            torch.tensor(self._answer_tokens(p, q)) for p, q in zip(self.probes, self.probe_seqs, strict=True)
        ]

    def _answer_tokens(self, p: ImageProblem, seq: Sequence) -> list[int]:
        """Indices (within the response) of the tokens that spell the asked-for word in the picture's
        description: "green" in "The image shows a green circle." for the colour question."""
        start = p.scene.description.index(p.answer)
        end, out, done = start + len(p.answer), [], 0
        resp = seq.ids[seq.loss_from :]
        for k in range(len(resp)):
            reach = len(self.enc.tok.decode(resp[: k + 1]))
            if reach > start and done < end:
                out.append(k)
            done = reach
        return out

    @torch.no_grad()
    def probes_named(self, model: R1VModel) -> int:
        """On how many probe questions `model`, fed the reference response, predicts the asked-for word of
        the picture's description (one teacher-forced pass, a tenth of a greedy check's cost).

        The greedy answer copies that word, so while some probe's word is wrong the greedy check would
        almost surely fail too: training uses this to decide when a full check is worth running. It decides
        nothing about acceptance."""
        was = model.training
        model.eval()
        logits, target, _ = _forward(model, self.probe_seqs, self.probe_pixels, self.enc.pad)
        model.train(was)
        right = (logits.argmax(-1) == target).split([len(s.ids) - s.loss_from for s in self.probe_seqs])
        return sum(bool(r[k].all()) for r, k in zip(right, self.probe_words, strict=True))

    @torch.no_grad()
    def _answers(self, model: R1VModel, seqs: list[Sequence], embeds: torch.Tensor | None) -> list[str]:
        """Greedy decoding from each prompt up to the stop token or MAX_NEW tokens; prompts of equal length
        are decoded together (one KV cache, no padding needed)."""
        from r1v_quant.model.llm import KVCache

        lm, ctx = model.language_model, model.spec.tokens.img_context
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(s.loss_from, []).append(i)
        out = [""] * len(seqs)
        for members in groups.values():
            ids = torch.tensor([seqs[i].ids[: seqs[i].loss_from] for i in members])
            emb = lm.model.embed_tokens(ids)
            if embeds is not None:
                rows = torch.cat([embeds[seqs[i].image] for i in members])
                emb = emb.masked_scatter((ids == ctx)[..., None], rows.to(emb.dtype))
            cache = KVCache(model.spec.llm.num_layers)
            hidden = lm.forward_embeds(emb, cache)
            new = torch.empty((len(members), 0), dtype=torch.long)
            done = torch.zeros(len(members), dtype=torch.bool)
            for _ in range(MAX_NEW):
                nxt = lm.logits(hidden[:, -1]).argmax(-1)
                done |= nxt == self.enc.pad
                if done.all():
                    break
                new = torch.cat([new, nxt[:, None]], 1)
                hidden = lm.forward_embeds(lm.model.embed_tokens(nxt[:, None]), cache)
            for row, i in zip(new.tolist(), members, strict=True):
                row = row[: row.index(self.enc.pad)] if self.enc.pad in row else row
                out[i] = (
                    self.enc.tok.decode(row).rsplit("</think>", 1)[-1]
                    if not FULL
                    else self.enc.tok.decode(row)
                )
        return out

    def _image_hits(self, model: R1VModel, problems: list[ImageProblem], pixels, seqs) -> list[bool]:
        from r1v_quant.evaluate.answers import extract_answer, is_correct
        from r1v_quant.model.vision import extract_feature

        with torch.no_grad():
            embeds = extract_feature(model.vision_model, model.mlp1, model.spec, pixels)
        answers = self._answers(model, seqs, embeds)
        return [
            is_correct(extract_answer(a, "text"), p.answer, "text")
            for a, p in zip(answers, problems, strict=True)
        ]

    def measure(self, model: R1VModel, *, quick: bool = False) -> Skills:
        """The skills of `model`. `quick`: when a probe picture fails, the threshold cannot be reached, so
        the held-out sets (two thirds of the cost) are skipped and their accuracies left unmeasured (nan)."""
        from r1v_quant.evaluate.answers import extract_answer, is_correct

        was = model.training
        model.eval()
        probes = self._image_hits(model, self.probes, self.probe_pixels, self.probe_seqs)
        failed = [
            f"{p.task} of {p.scene.description[16:-1]}"
            for p, h in zip(self.probes, probes, strict=True)
            if not h
        ]
        if quick and failed:
            model.train(was)
            return Skills(math.nan, math.nan, {}, failed)
        img = self._image_hits(model, self.images, self.pixels, self.image_seqs)
        txt = [
            is_correct(extract_answer(a, p.grading), p.answer, p.grading)
            for a, p in zip(self._answers(model, self.text_seqs, None), self.texts, strict=True)
        ]
        model.train(was)
        per_task = {
            t: sum(h for h, p in zip(img, self.images, strict=True) if p.task == t) / EVAL_IMAGE_PER_TASK
            for t in IMAGE_TASKS
        }
        return Skills(sum(img) / len(img), sum(txt) / len(txt), per_task, failed)


def lr_factor(step: int) -> float:
    """Learning rate relative to its peak: linear warmup, then a cosine down to LR_FLOOR at LR_HORIZON steps,
    flat after that (the step cap does not stretch the schedule: a build that needs more steps goes on
    learning at the floor)."""
    t = min(step, LR_HORIZON) / LR_HORIZON
    return min(1.0, (step + 1) / WARMUP) * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    skills: Skills
    history: list[dict]
    reached: bool
    seconds: dict[str, float] = field(default_factory=dict)  # where the training time went


def train_to_skill(
    model: R1VModel,
    enc: Encoder,
    *,
    max_steps: int,
    min_accuracy: float,
    seed: int,
    eval_every: int = 50,
    progress: Callable[[int, float], None] | None = None,
    as_saved: Callable[[R1VModel], R1VModel] = lambda m: m,
) -> TrainResult:
    """Train until both held-out accuracies reach `min_accuracy` (checked every `eval_every` steps) or
    `max_steps`; with `min_accuracy` 0, train exactly `max_steps` steps."""
    torch.manual_seed(seed)
    # same seed -> same bytes on one machine: CPU kernels that accumulate in parallel otherwise vary
    torch.use_deterministic_algorithms(True)
    try:
        return _train(model, enc, max_steps, min_accuracy, seed, eval_every, progress, as_saved)
    finally:
        torch.use_deterministic_algorithms(False)


def _train(
    model: R1VModel,
    enc: Encoder,
    max_steps: int,
    min_accuracy: float,
    seed: int,
    eval_every: int,
    progress: Callable[[int, float], None] | None,
    as_saved: Callable[[R1VModel], R1VModel],
) -> TrainResult:
    held = HeldOut(enc)
    probe = SceneProbe(model.spec.llm.hidden_size)
    groups = [
        {"params": list(model.language_model.parameters()), "lr": LR["llm"]},
        {"params": list(model.mlp1.parameters()) + list(probe.parameters()), "lr": LR["mlp1"]},
        {"params": list(model.vision_model.parameters()), "lr": LR["vision"]},
    ]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(seed)
    model.train()
    # the weights measured and written are an exponential moving average of the trained ones: single
    # steps on a few fresh examples move a small model's answers around, the average holds still
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    losses: list[float] = []
    history: list[dict] = []
    skills, reached, step = Skills(0.0, 0.0, {}), False, 0
    seconds = dict.fromkeys(("text_steps", "image_steps", "ema", "gate", "greedy_checks"), 0.0)
    for step in range(1, max_steps + 1):
        t0 = time.perf_counter()
        if step > TEXT_FIRST and step % IMAGE_EVERY == 0:
            # every question about a scene shares its one vision pass
            picked, seqs = [], []
            for sc in scenes(SCENES_PER_STEP, rng.randrange(2**31)):
                for p in scene_problems(sc, rng.randrange(2**31)):
                    seqs.append(enc.encode(p.question, p.response(), len(picked)))
                picked.append(p)
            pixels = _pixels(picked)
        else:
            seqs = [
                enc.encode(p.question, p.response()) for p in text_problems(TEXT_BATCH, rng.randrange(2**31))
            ]
            pixels = None
        logits, target, feats = _forward(model, seqs, pixels, enc.pad)
        loss = F.cross_entropy(logits, target)
        total = loss
        if feats is not None and AUX_WEIGHT:
            total = loss + AUX_WEIGHT * probe.loss(feats, [p.scene for p in picked])
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        t1 = time.perf_counter()
        seconds["image_steps" if feats is not None else "text_steps"] += t1 - t0
        with torch.no_grad():
            decay = min(EMA_DECAY, step / (step + 10))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        seconds["ema"] += time.perf_counter() - t1
        if progress:
            progress(step, losses[-1])
        if (step > TEXT_FIRST and step % eval_every == 0) or step == max_steps:
            # the weights as written: averaged, outliers, bf16; the last check (at the cap) is always full
            t0 = time.perf_counter()
            saved = as_saved(ema)
            recent = losses[-eval_every:]
            entry = {"step": step, "loss": round(sum(recent) / len(recent), 4)}
            entry["probes_named"] = named = held.probes_named(saved)
            t1 = time.perf_counter()
            seconds["gate"] += t1 - t0
            # greedy decoding (the measurement) only once (nearly) every probe's word is named: before that
            # it would fail them anyway, at ten times the cost
            if named >= len(held.probes) - GATE_SLACK or step == max_steps:
                skills = held.measure(saved, quick=step != max_steps)
                entry.update(skills.as_dict())
                seconds["greedy_checks"] += time.perf_counter() - t1
            history.append(entry)
            if min_accuracy > 0 and skills.reached(min_accuracy):
                reached = True
                break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if step:
        model.load_state_dict(ema.state_dict())
    reached = reached or min_accuracy <= 0
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    return TrainResult(step if max_steps else 0, losses, skills, history, reached, seconds)
