"""Generated reasoning problems with worked `<think>` solutions, deterministic under a seed.

Used to train the tiny replica (so it behaves like a trained model), as the text part of the built-in
calibration set, and for held-out quality measurements. Every problem has one checkable answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle")


@dataclass(frozen=True)
class Problem:
    question: str
    thinking: str
    answer: str
    kind: str

    def response(self) -> str:
        """Assistant text after the prompt's opening `<think>\\n`."""
        return f"{self.thinking}\n</think>\n\nThe answer is \\boxed{{{self.answer}}}."


def _add(r: random.Random) -> Problem:
    a, b = r.randint(10, 999), r.randint(10, 999)
    steps = [f"We need {a} + {b}."]
    units = (a % 10) + (b % 10)
    steps.append(f"Units: {a % 10} + {b % 10} = {units}.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return Problem(f"What is {a} + {b}?", "\n".join(steps), str(a + b), "add")


def _mul(r: random.Random) -> Problem:
    a, b = r.randint(11, 99), r.randint(3, 49)
    tens, ones = b // 10 * 10, b % 10
    steps = [
        f"Split {b} into {tens} + {ones}.",
        f"{a} * {tens} = {a * tens}.",
        f"{a} * {ones} = {a * ones}.",
        f"Add: {a * tens} + {a * ones} = {a * b}.",
    ]
    return Problem(f"The table shows {a} and {b}. What is {a} * {b}?", "\n".join(steps), str(a * b), "mul")


def _sub(r: random.Random) -> Problem:
    a = r.randint(100, 999)
    b = r.randint(10, a - 1)
    steps = [f"Start from {a}.", f"Take away {b}.", f"{a} - {b} = {a - b}."]
    return Problem(
        f"Tom has {a} coins and spends {b}. How many are left?", "\n".join(steps), str(a - b), "sub"
    )


def _compare(r: random.Random) -> Problem:
    a, b = r.sample(range(10, 500), 2)
    big = max(a, b)
    steps = [f"Compare {a} and {b}.", f"{big} is larger because {big} - {min(a, b)} = {abs(a - b)} > 0."]
    return Problem(f"Which is larger, {a} or {b}?", "\n".join(steps), str(big), "compare")


def _sequence(r: random.Random) -> Problem:
    start, step = r.randint(1, 30), r.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    nxt = seq[-1] + step
    steps = [f"The differences are {step} each time.", f"So the next term is {seq[-1]} + {step} = {nxt}."]
    return Problem(f"What comes next: {', '.join(map(str, seq))}, ?", "\n".join(steps), str(nxt), "sequence")


def _units(r: random.Random) -> Problem:
    m = r.randint(2, 90)
    steps = ["One meter is 100 centimeters.", f"{m} * 100 = {m * 100}."]
    return Problem(f"How many centimeters are in {m} meters?", "\n".join(steps), str(m * 100), "units")


GENERATORS = (_add, _mul, _sub, _compare, _sequence, _units)


def text_problems(n: int, seed: int) -> list[Problem]:
    r = random.Random(seed)
    return [r.choice(GENERATORS)(r) for _ in range(n)]


@dataclass(frozen=True)
class ImageProblem:
    """A solid-colour shape on a light background; the question is about its colour or shape."""

    color: str
    shape: str
    question: str
    answer: str

    def response(self) -> str:
        return (
            f"The image shows a {self.color} {self.shape}.\n</think>\n\n"
            f"The answer is \\boxed{{{self.answer}}}."
        )


def image_problems(n: int, seed: int) -> list[ImageProblem]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        color, shape = r.choice(list(COLORS)), r.choice(SHAPES)
        if r.random() < 0.5:
            out.append(ImageProblem(color, shape, "What color is the shape in the image?", color))
        else:
            out.append(ImageProblem(color, shape, "What shape is in the image?", shape))
    return out


def render_shape(color: str, shape: str, size: tuple[int, int] = (448, 448)):
    """PIL image of one coloured shape (the picture behind an ImageProblem)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return img
