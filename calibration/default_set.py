"""The built-in calibration set: offline, deterministic under a seed, multimodal, reasoning-length.

Images are drawn here with PIL (bar charts, line plots, geometry, tables, text-in-image, symbol puzzles)
or taken from the real photos that ship with scikit-image (skipped cleanly when it is not installed).
Prompts follow MMMU / MathVista / R1 styles; assistant turns are `<think>…</think>answer` whose reasoning
is grown with re-checks until the sample reaches a drawn share of the token budget, so calibration sees
the long sequences a reasoning model actually produces. Text-only problems are mixed in at `text_ratio`.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from r1v_quant.calibration.dataset import CalibrationSet, Sample, Turn
from r1v_quant.data.synthdata import text_problems
from r1v_quant.model.preprocess import find_grid
from r1v_quant.util.errors import R1VError

TokenCounter = Callable[[str], int]
TOKENS_PER_TILE = 256
TEMPLATE_OVERHEAD = 24  # role markers, <img></img>, BOS/EOS: a generous allowance
SYSTEM_PROMPT = "You are a careful assistant. Think step by step before answering."
R1_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
MATHVISTA_HINT = "Hint: Please answer the question and provide the final answer at the end."
PHOTO_SLOTS = 2  # photos per pass over the six drawn kinds: about a quarter of the image samples
MMMU_SUFFIX = "Answer with the option's letter from the given choices."


def approx_tokens(text: str) -> int:
    """Fallback token estimate (about 3 characters per token for English BPE) when no tokenizer is given."""
    return math.ceil(len(text) / 3)


@dataclass
class _Problem:
    """One generated question: the picture (if any), the prompt, the base reasoning and how to extend it."""

    kind: str
    image: Image.Image | None
    prompt: str
    steps: list[str]
    rechecks: Callable[[int], list[str]]  # round k of "wait, let me verify" reasoning
    final: str


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", size, (250, 250, 246))
    return img, ImageDraw.Draw(img)


def _cycle(items: list[str], k: int, width: int = 3) -> list[str]:
    """A rotating window over `items`, so successive re-check rounds do not repeat verbatim."""
    if not items:
        return []
    return [items[(k * width + j) % len(items)] for j in range(min(width, len(items)))]


# -- image problems ----------------------------------------------------------------------------------------
def _bar_chart(r: random.Random, wide: bool) -> _Problem:
    names = r.sample(
        ["apples", "pears", "plums", "kiwis", "limes", "figs", "dates", "cherries"], r.randint(4, 6)
    )
    vals = [r.randint(5, 95) for _ in names]
    size = (896, 448) if wide else (448, 448)
    img, d = _canvas(size)
    w, h = size
    x0, y0, x1, y1 = 50, 40, w - 20, h - 60
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(30, 30, 30), width=2)
    slot = (x1 - x0) / len(names)
    for k, (n, v) in enumerate(zip(names, vals, strict=True)):
        bx = x0 + k * slot + slot * 0.2
        top = y1 - (y1 - y0) * v / 100
        d.rectangle([bx, top, bx + slot * 0.6, y1], fill=(60 + 30 * k, 110, 200 - 25 * k))
        d.text((bx, top - 20), str(v), fill=(0, 0, 0), font=_font(16))
        d.text((bx, y1 + 8), n, fill=(0, 0, 0), font=_font(14))
    d.text((x0, 8), "Fruit sold per day", fill=(0, 0, 0), font=_font(18))
    reading = [f"The bar for {n} is labelled {v}." for n, v in zip(names, vals, strict=True)]
    total, running, sums = 0, [], []
    for n, v in zip(names, vals, strict=True):
        total += v
        running.append(total)
        sums.append(f"Adding {n}: running total {total}.")
    q = r.choice(["sum", "max", "range"])
    if q == "sum":
        prompt, ans = "What is the total number of fruit sold across all bars?", str(total)
        steps = ["I need to read every bar and add the values.", *reading, *sums]
    elif q == "max":
        best = max(range(len(vals)), key=lambda k: (vals[k], -k))
        prompt, ans = "Which fruit has the tallest bar?", names[best]
        steps = ["I need to compare the bar heights.", *reading, f"The largest value is {vals[best]}."]
    else:
        prompt, ans = (
            "What is the difference between the tallest and the shortest bar?",
            str(max(vals) - min(vals)),
        )
        steps = [*reading, f"Largest {max(vals)}, smallest {min(vals)}, difference {max(vals) - min(vals)}."]

    def rechecks(k: int) -> list[str]:
        i, j = k % len(vals), (k + 1 + k // len(vals)) % len(vals)
        cmp = ">" if vals[i] > vals[j] else ("<" if vals[i] < vals[j] else "=")
        back = sum(vals[len(vals) - 1 - k % len(vals) :])
        return [
            "Wait, let me double-check the readings against the axis.",
            f"{names[i]} ({vals[i]}) {cmp} {names[j]} ({vals[j]}).",
            f"Summing the last {k % len(vals) + 1} bars from the right gives {back}.",
            *_cycle(reading, k),
        ]

    return _Problem("bar_chart", img, prompt, steps, rechecks, ans)


def _line_plot(r: random.Random, wide: bool) -> _Problem:
    n = r.randint(5, 8)
    years = list(range(2010 + r.randint(0, 8), 2100))[:n]
    vals = [r.randint(10, 90)]
    for _ in range(n - 1):
        vals.append(max(0, min(100, vals[-1] + r.randint(-25, 25))))
    size = (896, 448) if wide else (448, 448)
    img, d = _canvas(size)
    w, h = size
    x0, y0, x1, y1 = 50, 40, w - 30, h - 60
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(30, 30, 30), width=2)
    pts = [(x0 + (x1 - x0) * (k + 0.5) / n, y1 - (y1 - y0) * v / 100) for k, v in enumerate(vals)]
    d.line(pts, fill=(200, 60, 40), width=3)
    for (px, py), yr, v in zip(pts, years, vals, strict=True):
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(200, 60, 40))
        d.text((px - 10, py - 22), str(v), fill=(0, 0, 0), font=_font(14))
        d.text((px - 18, y1 + 8), str(yr), fill=(0, 0, 0), font=_font(13))
    d.text((x0, 8), "Visitors (thousands) per year", fill=(0, 0, 0), font=_font(18))
    diffs = [vals[k + 1] - vals[k] for k in range(n - 1)]
    lines = [
        f"From {years[k]} to {years[k + 1]}: {vals[k + 1]} - {vals[k]} = {diffs[k]}." for k in range(n - 1)
    ]
    best = max(range(n - 1), key=lambda k: (diffs[k], -k))
    prompt = "Between which two consecutive years did the number of visitors increase the most?"
    steps = [
        "I should read each point, then compute the change between neighbouring years.",
        *[f"In {y} the value is {v}." for y, v in zip(years, vals, strict=True)],
        *lines,
        f"The largest change is {diffs[best]}, between {years[best]} and {years[best + 1]}.",
    ]

    def rechecks(k: int) -> list[str]:
        j = k % (n - 1)
        return [
            "Hmm, let me verify that difference again, a point can be misread.",
            f"{years[j + 1]} is at {vals[j + 1]} and {years[j]} is at {vals[j]}, "
            f"so the change is {diffs[j]}.",
            f"Compared with the best so far ({diffs[best]}), {diffs[j]} is "
            f"{'not larger' if diffs[j] <= diffs[best] else 'larger'}.",
            f"Overall change from {years[0]} to {years[-1]}: {vals[-1] - vals[0]}.",
        ]

    return _Problem("line_plot", img, prompt, steps, rechecks, f"{years[best]} and {years[best + 1]}")


def _geometry(r: random.Random, wide: bool) -> _Problem:
    img, d = _canvas((448, 448))
    m = r.randint(1, 3)
    a, b, c = (t * m for t in r.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10)]))
    shape = r.choice(["triangle", "rectangle"])
    if shape == "triangle":
        p = [(80, 360), (360, 360), (80, 120)]
        d.polygon(p, outline=(20, 20, 120), width=3)
        d.rectangle([80, 340, 100, 360], outline=(20, 20, 120))
        d.text((200, 370), f"{b} cm", fill=(0, 0, 0), font=_font(18))
        d.text((20, 230), f"{a} cm", fill=(0, 0, 0), font=_font(18))
        d.text((230, 210), "x", fill=(0, 0, 0), font=_font(22))
        prompt = "The triangle has a right angle at the bottom left. What is the length x of the hypotenuse?"
        steps = [
            f"The legs are {a} cm and {b} cm, and x is the side opposite the right angle.",
            f"By the Pythagorean theorem, x^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {a * a + b * b}.",
            f"The square root of {a * a + b * b} is {c}, because {c} * {c} = {c * c}.",
        ]
        ans = f"{c} cm"
        facts = [
            f"Check: {c}^2 - {a}^2 = {c * c - a * a} = {b}^2.",
            f"Check: {c}^2 - {b}^2 = {c * c - b * b} = {a}^2.",
            f"The area would be {a} * {b} / 2 = {a * b // 2 if a * b % 2 == 0 else a * b / 2} square cm.",
            f"The perimeter would be {a} + {b} + {c} = {a + b + c} cm.",
            f"The hypotenuse {c} must exceed both legs {a} and {b}, and it does.",
        ]
    else:
        d.rectangle([70, 130, 380, 320], outline=(20, 100, 40), width=3)
        d.line([(70, 320), (380, 130)], fill=(120, 120, 120), width=2)
        d.text((200, 330), f"{b} m", fill=(0, 0, 0), font=_font(18))
        d.text((20, 215), f"{a} m", fill=(0, 0, 0), font=_font(18))
        prompt = "What are the perimeter and the diagonal of the rectangle?"
        steps = [
            f"The sides are {a} m and {b} m.",
            f"Perimeter = 2 * ({a} + {b}) = 2 * {a + b} = {2 * (a + b)} m.",
            f"Diagonal^2 = {a * a} + {b * b} = {c * c}, so the diagonal is {c} m.",
        ]
        ans = f"perimeter {2 * (a + b)} m, diagonal {c} m"
        facts = [
            f"Check the perimeter by walking around: {a} + {b} + {a} + {b} = {2 * (a + b)}.",
            f"Check the diagonal: {c} * {c} = {c * c} and {a * a} + {b * b} = {a * a + b * b}.",
            f"The area is {a} * {b} = {a * b} square m, not asked but consistent.",
        ]

    def rechecks(k: int) -> list[str]:
        return ["Wait, let me make sure I used the right sides.", *_cycle(facts, k, 2)]

    return _Problem("geometry", img, prompt, steps, rechecks, ans)


def _table(r: random.Random, wide: bool) -> _Problem:
    items = r.sample(["pen", "notebook", "ruler", "eraser", "marker", "stapler", "folder"], r.randint(3, 5))
    price = [r.randint(1, 12) for _ in items]
    qty = [r.randint(1, 9) for _ in items]
    size = (896, 448) if wide else (448, 448)
    img, d = _canvas(size)
    w = size[0]
    cols = [30, int(w * 0.45), int(w * 0.72), w - 20]
    y = 40
    for row in [("item", "price ($)", "quantity"), *zip(items, map(str, price), map(str, qty), strict=True)]:
        for k, cell in enumerate(row):
            d.rectangle([cols[k], y, cols[k + 1], y + 44], outline=(40, 40, 40))
            d.text((cols[k] + 8, y + 12), cell, fill=(0, 0, 0), font=_font(18))
        y += 44
    costs = [p * q for p, q in zip(price, qty, strict=True)]
    lines = [f"{i}: {p} * {q} = {c}." for i, p, q, c in zip(items, price, qty, costs, strict=True)]
    prompt = "Using the table, how much do all the items cost in total?"
    steps = ["Each row gives a unit price and a quantity; the row cost is their product.", *lines]
    run = 0
    for i, c in zip(items, costs, strict=True):
        run += c
        steps.append(f"After {i}, the running total is {run}.")

    def rechecks(k: int) -> list[str]:
        j = k % len(items)
        return [
            "Let me re-read that row of the table to be sure.",
            f"Row {j + 1} says {items[j]}, price {price[j]}, quantity {qty[j]}.",
            f"{qty[j]} times {price[j]} is {costs[j]}: {' + '.join([str(price[j])] * qty[j])} = {costs[j]}.",
            f"The total without {items[j]} would be {sum(costs) - costs[j]}.",
        ]

    return _Problem("table", img, prompt, steps, rechecks, f"${sum(costs)}")


_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dogs",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "near",
    "a",
    "quiet",
    "river",
    "under",
    "bright",
    "morning",
    "light",
    "and",
    "every",
    "green",
    "tree",
    "sways",
    "in",
    "the",
    "gentle",
    "wind",
]


def _text_image(r: random.Random, wide: bool) -> _Problem:
    lines = [" ".join(r.sample(_WORDS, r.randint(3, 5))) for _ in range(r.randint(3, 5))]
    img, d = _canvas((448, 448))
    for k, line in enumerate(lines):
        d.text((20, 40 + 60 * k), line, fill=(10, 10, 10), font=_font(20))
    letter = r.choice("aeiorst")
    counts = [line.count(letter) for line in lines]
    prompt = f"How many times does the letter '{letter}' appear in the text in the image?"
    steps = ["I will read the text line by line and count the letter in each line."]
    for k, (line, c) in enumerate(zip(lines, counts, strict=True)):
        words = [f"'{w}' has {w.count(letter)}" for w in line.split()]
        steps.append(f'Line {k + 1} reads: "{line}". ' + ", ".join(words) + f". Line total: {c}.")
    steps.append(f"Altogether: {' + '.join(map(str, counts))} = {sum(counts)}.")

    def rechecks(k: int) -> list[str]:
        j = k % len(lines)
        spelled = " ".join(lines[j].replace(" ", "_"))
        return [
            f"Wait, let me spell out line {j + 1} letter by letter: {spelled}.",
            f"Counting '{letter}' there again gives {counts[j]}.",
        ]

    return _Problem("text_in_image", img, prompt, steps, rechecks, str(sum(counts)))


def _symbol_puzzle(r: random.Random, wide: bool) -> _Problem:
    sq, ci, tr = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    img, d = _canvas((448, 448))

    def sym(kind: str, x: int, y: int) -> None:
        box = [x, y, x + 30, y + 30]
        if kind == "s":
            d.rectangle(box, fill=(40, 80, 220))
        elif kind == "c":
            d.ellipse(box, fill=(220, 40, 40))
        else:
            d.polygon([(x + 15, y), (x, y + 30), (x + 30, y + 30)], fill=(40, 170, 60))

    rows = [("ss", 2 * sq), ("sc", sq + ci), ("ct", ci + tr)]
    for k, (syms, total) in enumerate(rows):
        y = 60 + 90 * k
        for j, s in enumerate(syms):
            sym(s, 40 + 80 * j, y)
            if j < len(syms) - 1:
                d.text((85 + 80 * j, y + 2), "+", fill=(0, 0, 0), font=_font(24))
        d.text((200, y + 2), f"= {total}", fill=(0, 0, 0), font=_font(24))
    d.text((40, 340), "square + circle + triangle = ?", fill=(0, 0, 0), font=_font(20))
    prompt = "Each shape stands for a number. What is square + circle + triangle?"
    steps = [
        "Let me write the equations: blue square = S, red circle = C, green triangle = T.",
        f"First row: S + S = {2 * sq}, so S = {sq}.",
        f"Second row: S + C = {sq + ci}, so C = {sq + ci} - {sq} = {ci}.",
        f"Third row: C + T = {ci + tr}, so T = {ci + tr} - {ci} = {tr}.",
        f"Then S + C + T = {sq} + {ci} + {tr} = {sq + ci + tr}.",
    ]
    checks = [
        f"Substitute back: {sq} + {sq} = {2 * sq}, matches the first row.",
        f"{sq} + {ci} = {sq + ci}, matches the second row.",
        f"{ci} + {tr} = {ci + tr}, matches the third row.",
        f"Another route: (S + C) + (C + T) - C = {sq + ci} + {ci + tr} - {ci} = {sq + ci + tr}.",
    ]

    def rechecks(k: int) -> list[str]:
        return ["Wait, I should verify each equation with the values found.", *_cycle(checks, k, 2)]

    return _Problem("symbol_puzzle", img, prompt, steps, rechecks, str(sq + ci + tr))


# scikit-image photos: (loader name, what it shows, three wrong options)
PHOTOS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("astronaut", "an astronaut in a white spacesuit", ("a firefighter", "a deep-sea diver", "a chef")),
    ("coffee", "a cup of coffee on a saucer", ("a bowl of soup", "a glass of juice", "a plate of pasta")),
    ("chelsea", "a tabby cat", ("a dog", "a rabbit", "a fox")),
    ("rocket", "a rocket on a launch pad", ("an airliner at a gate", "a lighthouse", "a crane")),
    ("camera", "a man operating a camera on a tripod", ("a woman painting", "a runner", "a cyclist")),
    ("coins", "a collection of old coins", ("a pile of buttons", "a chessboard", "a set of keys")),
    (
        "hubble_deep_field",
        "a deep-space image full of galaxies",
        ("a city at night", "a coral reef", "a snowfall"),
    ),
    (
        "immunohistochemistry",
        "a stained tissue sample under a microscope",
        ("a satellite map", "a marble slab", "a painting"),
    ),
)


def available_photos() -> list[tuple[str, str, tuple[str, str, str]]]:
    """The photo entries whose images scikit-image can provide offline ([] when it is missing)."""
    try:
        import skimage.data  # noqa: F401  (slow-ish import, only when photos are wanted)
    except ImportError:
        return []
    return list(PHOTOS)


def _photo(r: random.Random, entry: tuple[str, str, tuple[str, str, str]], keep_aspect: bool) -> _Problem:
    import numpy as np
    import skimage.data

    name, what, wrong = entry
    arr = np.asarray(getattr(skimage.data, name)())
    img = Image.fromarray(arr).convert("RGB")
    if not keep_aspect:  # a square crop is one tile: keeps short sequence budgets for text
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((448, 448), Image.Resampling.BICUBIC)
    mean = np.asarray(img, dtype=np.float64).mean(axis=(0, 1))
    bright = int(round(mean.mean() / 255 * 100))
    channel = ["red", "green", "blue"][int(mean.argmax())]
    options = [what, *wrong]
    r.shuffle(options)
    letters = "ABCD"
    correct = letters[options.index(what)]
    opt_text = "\n".join(f"{letters[k]}. {o}" for k, o in enumerate(options))
    prompt = f"Which option best describes the main subject of the image?\n\nOptions:\n{opt_text}"
    steps = [
        "Let me look at the whole image first, then at the details.",
        f"The image is {img.width} by {img.height} pixels; its average brightness is about {bright} percent "
        f"and the strongest colour channel is {channel}.",
        f"The main subject appears to be {what}.",
        *[
            f"Option {letters[k]} says {o}; "
            + ("this matches what I see." if o == what else "nothing in the image supports this.")
            for k, o in enumerate(options)
        ],
    ]

    # Grounded detail for the re-check rounds: brightness and dominant colour of a 4x4 grid of regions.
    grid = np.asarray(img, dtype=np.float64)
    rows = ("top", "upper-middle", "lower-middle", "bottom")
    cols = ("left", "centre-left", "centre-right", "right")
    regions = []
    for a in range(4):
        for b in range(4):
            cell = grid[
                a * img.height // 4 : (a + 1) * img.height // 4, b * img.width // 4 : (b + 1) * img.width // 4
            ]
            m = cell.mean(axis=(0, 1))
            pct, tone = int(round(m.mean() / 255 * 100)), ["red", "green", "blue"][int(m.argmax())]
            regions.append(
                f"The {rows[a]} {cols[b]} region has brightness about {pct} percent, mostly {tone} tones."
            )

    def rechecks(k: int) -> list[str]:
        j = k % 4
        return [
            regions[k % len(regions)],
            f"Wait, let me reconsider option {letters[j]} ({options[j]}) more carefully.",
            f"Looking at the shapes and colours again, {options[j]} "
            + ("is indeed what the image shows." if options[j] == what else "does not fit the image."),
        ]

    return _Problem("photo", img, prompt, steps, rechecks, correct)


IMAGE_KINDS: dict[str, Callable[[random.Random, bool], _Problem]] = {
    "bar_chart": _bar_chart,
    "line_plot": _line_plot,
    "geometry": _geometry,
    "table": _table,
    "text_in_image": _text_image,
    "symbol_puzzle": _symbol_puzzle,
}


# -- text problems -----------------------------------------------------------------------------------------
_TEXT_OPENERS = (
    "Wait, let me verify this step by step once more.",
    "Hmm, before answering, let me re-read the question and redo the key step.",
    "Let me double-check the arithmetic in a different order.",
    "Actually, I should make sure I did not misread any number.",
)
_TEXT_CLOSERS = ("That is consistent with what I found.", "Yes, that still holds.", "Good, no mistake there.")


def _text_problem(r: random.Random, seed: int) -> _Problem:
    p = text_problems(1, seed)[0]
    steps = p.thinking.split("\n")
    if r.random() < 0.5:  # a second, longer chained problem so text samples are not all one-liners
        q = text_problems(1, seed + 7919)[0]
        prompt = f"{p.question} Then, separately: {q.question} Give both answers."
        steps += ["Now the second question.", *q.thinking.split("\n")]
        final_answer = f"{p.answer} and {q.answer}"
    else:
        prompt, final_answer = p.question, p.answer

    def rechecks(k: int) -> list[str]:
        opener, closer = _TEXT_OPENERS[k % len(_TEXT_OPENERS)], _TEXT_CLOSERS[k % len(_TEXT_CLOSERS)]
        return [opener, *_cycle(steps, k, 2), closer]

    return _Problem(f"text_{p.kind}", None, prompt, steps, rechecks, final_answer)


# -- assembly ----------------------------------------------------------------------------------------------
def _image_tokens(img: Image.Image) -> int:
    cols, rows = find_grid(img.width, img.height)
    tiles = cols * rows + (1 if cols * rows > 1 else 0)
    return tiles * TOKENS_PER_TILE + 2


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _style(r: random.Random, prob: _Problem) -> str:
    style = r.choice(["r1", "mathvista", "plain"]) if prob.kind != "photo" else "mmmu"
    if style == "r1":
        return f"{prob.prompt}\n{R1_SUFFIX}"
    if style == "mathvista":
        return f"{MATHVISTA_HINT}\nQuestion: {prob.prompt}"
    if style == "mmmu":
        return f"{prob.prompt}\n\n{MMMU_SUFFIX}"
    return prob.prompt


def _response(prob: _Problem, budget: int, count: TokenCounter) -> str:
    """`<think>` reasoning within `budget` tokens: base steps (cut short if needed), then re-check rounds."""
    final = f"\n</think>\n\nThe answer is \\boxed{{{prob.final}}}."
    paras = prob.steps[:1]  # the first step always stays, even over budget (rendering then truncates)
    used = count("<think>\n" + paras[0] + final)
    more = itertools.chain(prob.steps[1:], ("\n".join(prob.rechecks(k)) for k in itertools.count()))
    for para in more:
        cost = count(para) + 1
        if used + cost > budget:
            break
        paras.append(para)
        used += cost
    return "<think>\n" + "\n".join(paras) + final


def build_default_set(
    n: int,
    *,
    seed: int = 0,
    text_ratio: float = 0.25,
    seq_len: int = 4096,
    count_tokens: TokenCounter | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """`n` samples, `round(n * text_ratio)` of them text-only; each aims at 55-95 % of `seq_len` tokens.

    `progress`: a progress bar on stderr once building takes over a second (a large --samples).

    Below 386 tokens no image fits beside a question and its reasoning, so every sample is text-only.
    `count_tokens` should be the model tokenizer's length function, so lengths fit the real vocabulary; the
    rough 3-characters-per-token estimate is used without it. Same arguments -> byte-identical set.
    """
    if n < 1:
        raise R1VError(f"the calibration set needs at least one sample (got --samples {n})")
    if not 0.0 <= text_ratio <= 1.0:
        raise R1VError(f"--text-ratio must be between 0 and 1 (got {text_ratio})")
    if seq_len < 64:
        raise R1VError(f"--seq-len {seq_len} is too short for a chat sample (need at least 64)")
    count = count_tokens or approx_tokens
    r = random.Random(f"r1v-quant-default-set/{seed}")
    n_text = round(n * text_ratio)
    is_text = [True] * n_text + [False] * (n - n_text)
    r.shuffle(is_text)
    photos = available_photos()
    kinds: list[str] = []
    photo_queue: list[tuple[str, str, tuple[str, str, str]]] = []
    samples: list[Sample] = []
    sources: dict[str, Path | bytes] = {}
    wide = seq_len >= 2048  # multi-tile images only when the budget leaves room for reasoning text
    # Below this length a one-tile image leaves no room for a question and reasoning: text only then.
    images_fit = seq_len >= TOKENS_PER_TILE + 2 + 128
    bar = tqdm(is_text, desc="building the calibration set", unit="sample", delay=1.0, disable=not progress)
    for k, text_only in enumerate(bar):
        if text_only or not images_fit:
            prob = _text_problem(r, seed * 100_003 + k)
        else:
            if not kinds:  # a shuffled pass over every kind, so small sets still cover them all
                kinds = list(IMAGE_KINDS) + ["photo"] * (PHOTO_SLOTS if photos else 0)
                r.shuffle(kinds)
            kind = kinds.pop()
            if kind == "photo":
                if not photo_queue:
                    photo_queue = list(photos)
                    r.shuffle(photo_queue)
                prob = _photo(r, photo_queue.pop(), keep_aspect=seq_len >= 4096)
            else:
                prob = IMAGE_KINDS[kind](r, wide and r.random() < 0.5)
        sid = f"{k:05d}-{prob.kind}"
        user = _style(r, prob)
        turns: list[Turn] = []
        if r.random() < 0.25:
            turns.append(Turn("system", SYSTEM_PROMPT))
        images: tuple[str, ...] = ()
        fixed = count(user) + TEMPLATE_OVERHEAD + (count(SYSTEM_PROMPT) if turns else 0)
        if prob.image is not None:
            key = f"images/{sid}.png"
            sources[key] = _png(prob.image)
            images = (key,)
            user = "<image>\n" + user
            fixed += _image_tokens(prob.image)
        target = min(max(int(seq_len * r.uniform(0.55, 0.95)), fixed + 96), seq_len - 8)
        turns.append(Turn("user", user, images))
        turns.append(Turn("assistant", _response(prob, target - fixed, count)))
        samples.append(Sample(sid, tuple(turns)))
    return CalibrationSet(samples, sources, "default")
