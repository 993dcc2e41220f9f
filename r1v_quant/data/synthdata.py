"""Generated reasoning problems with worked `<think>` solutions, deterministic under a seed.

Used to train the tiny replica (so it behaves like a trained model), as the text part of the built-in
calibration set, and for held-out quality measurements. Every problem has one checkable answer.

Image problems are questions about rendered scenes whose answer is only in the picture: the colour and
the shape of a shape, and which of two shapes is larger. The reasoning first describes the scene (the
same description whatever is asked), then answers. (Counting shapes, where a shape is and reading a bar
chart were tried too: on 2 CPU cores they did not reach the accuracy threshold within minutes of
training, so the replica does not claim them.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
IMAGE_TASKS = ("color", "shape", "larger")
BACKGROUND = (245, 245, 240)


@dataclass(frozen=True)
class Problem:
    question: str
    thinking: str
    answer: str
    kind: str

    @property
    def grading(self) -> str:
        """How the answer is compared (answers.KINDS): a number, or a word."""
        return "numeric" if self.answer.isdigit() else "text"

    def response(self) -> str:
        """Assistant text after the prompt's opening `<think>\\n`."""
        return f"{self.thinking}\n</think>\n\nThe answer is \\boxed{{{self.answer}}}."


# -- text problems: each step of the reasoning is one small, checkable operation (a model of a few million
# parameters trained for a few minutes can learn to copy numbers and a few facts, not multi-digit arithmetic)
def _add(r: random.Random) -> Problem:
    a, b = r.randint(1, 5), r.randint(1, 5)
    steps = [f"We need {a} + {b}.", f"{a} + {b} = {a + b}."]
    return Problem(f"What is {a} + {b}?", "\n".join(steps), str(a + b), "add")


def _parity(r: random.Random) -> Problem:
    n = r.randint(10, 999)
    d = n % 10
    kind = "even" if d % 2 == 0 else "odd"
    steps = [f"The last digit of {n} is {d}.", f"{d} is {kind}.", f"So {n} is {kind}."]
    return Problem(f"Is {n} even or odd?", "\n".join(steps), kind, "parity")


def _compare(r: random.Random) -> Problem:
    ta, tb = r.sample(range(1, 10), 2)
    a, b = 10 * ta + r.randint(0, 9), 10 * tb + r.randint(0, 9)
    big = max(a, b)
    steps = [f"Compare {a} and {b}.", f"Tens: {max(ta, tb)} > {min(ta, tb)}.", f"So {big} is larger."]
    return Problem(f"Which is larger, {a} or {b}?", "\n".join(steps), str(big), "compare")


def _tens(r: random.Random) -> Problem:
    n = r.randint(10, 99) * 10
    steps = [f"{n} = {n // 10} * 10.", f"So {n} is {n // 10} tens."]
    return Problem(f"How many tens are in {n}?", "\n".join(steps), str(n // 10), "tens")


def _units(r: random.Random) -> Problem:
    m = r.randint(2, 90)
    steps = ["One meter is 100 centimeters.", f"{m} * 100 = {m * 100}."]
    return Problem(f"How many centimeters are in {m} meters?", "\n".join(steps), str(m * 100), "units")


GENERATORS = (_add, _parity, _compare, _tens, _units)


def text_problems(n: int, seed: int) -> list[Problem]:
    r = random.Random(seed)
    return [r.choice(GENERATORS)(r) for _ in range(n)]


# -- image problems ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One shape of a scene: its box is (x0, y0, x1, y1) in a 448 x 448 frame, scaled to the image size."""

    color: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    kind: str  # "single" | "pair"
    items: tuple[Item, ...]
    description: str
    background: tuple[int, int, int] = BACKGROUND

    def render(self, size: tuple[int, int] = (448, 448)) -> Any:
        """The picture as a PIL RGB image (any size: the scene is drawn in a 448 x 448 frame, stretched)."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", size, self.background)
        d = ImageDraw.Draw(img)
        sx, sy = size[0] / 448, size[1] / 448
        for it in self.items:
            x0, y0, x1, y1 = it.box
            box = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
            _draw(d, it.shape, box, COLORS[it.color])
        return img


@dataclass(frozen=True)
class ImageProblem:
    """A question about a rendered scene; `task` is one of IMAGE_TASKS."""

    scene: Scene
    task: str
    question: str
    answer: str

    @property
    def grading(self) -> str:
        return "numeric" if self.answer.isdigit() else "text"

    def response(self) -> str:
        return f"{self.scene.description}\n</think>\n\nThe answer is \\boxed{{{self.answer}}}."

    def render(self) -> Any:
        return self.scene.render()


def _draw(d: Any, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 12) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _free_box(
    r: random.Random, size: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    while True:  # the sizes drawn below always leave room: a few tries suffice
        x, y = r.randint(16, 432 - size), r.randint(16, 432 - size)
        box = (x, y, x + size, y + size)
        if all(_apart(box, t) for t in taken):
            return box


def _single(r: random.Random) -> Scene:
    """One shape near the middle, about half the frame wide: what the colour and shape questions ask about.
    The size varies little, so a square, a circle and a triangle also differ in how much they cover (one
    of the cues a small vision tower learns within minutes)."""
    color, shape, size = r.choice(list(COLORS)), r.choice(SHAPES), r.randint(216, 232)
    mid = (448 - size) // 2
    x, y = mid + r.randint(-12, 12), mid + r.randint(-12, 12)
    item = Item(color, shape, (x, y, x + size, y + size))
    return Scene("single", (item,), f"The image shows a {color} {shape}.")


def _pair(r: random.Random) -> Scene:
    (c1, c2), s1, s2 = r.sample(list(COLORS), 2), r.choice(SHAPES), r.choice(SHAPES)
    b1 = _free_box(r, r.randint(150, 200), [])
    b2 = _free_box(r, r.randint(50, 80), [b1])
    items = (Item(c1, s1, b1), Item(c2, s2, b2))
    return Scene("pair", items, f"The image shows a large {c1} {s1} and a small {c2} {s2}.")


def _questions(scene: Scene, r: random.Random) -> list[tuple[str, str, str]]:
    """(task, question, answer) for every question this scene answers."""
    it = scene.items[0]
    if scene.kind == "single":
        return [
            ("color", "What color is the shape in the image?", it.color),
            ("shape", "What shape is in the image?", it.shape),
        ]
    a, b = scene.items
    first, second = (a.color, b.color) if r.random() < 0.5 else (b.color, a.color)
    return [("larger", f"Which shape is larger, the {first} one or the {second} one?", a.color)]


SCENE_MAKERS = {"single": _single, "pair": _pair}
SCENE_WEIGHTS = {"single": 4, "pair": 1}
TASK_SCENE = {"color": "single", "shape": "single", "larger": "pair"}


def _shaded(scene: Scene, r: random.Random) -> Scene:
    shade = r.randint(-10, 5)
    return Scene(scene.kind, scene.items, scene.description, tuple(c + shade for c in BACKGROUND))


def scenes(n: int, seed: int) -> list[Scene]:
    r = random.Random(seed)
    kinds = [k for k, w in SCENE_WEIGHTS.items() for _ in range(w)]
    return [_shaded(SCENE_MAKERS[r.choice(kinds)](r), r) for _ in range(n)]


def scene_problems(scene: Scene, seed: int = 0) -> list[ImageProblem]:
    """Every question about one scene (the replica trains on them together: one vision pass, many answers)."""
    return [ImageProblem(scene, t, q, a) for t, q, a in _questions(scene, random.Random(seed))]


def image_problems(n: int, seed: int) -> list[ImageProblem]:
    """`n` questions, each about its own scene, the tasks in turn (so every task is measured)."""
    r = random.Random(seed)
    out: list[ImageProblem] = []
    while len(out) < n:
        task = IMAGE_TASKS[len(out) % len(IMAGE_TASKS)]
        scene = _shaded(SCENE_MAKERS[TASK_SCENE[task]](r), r)
        out += [p for p in scene_problems(scene, r.randrange(2**31)) if p.task == task]
    return out


def shape_scene(color: str, shape: str) -> Scene:
    """One shape in the middle, half the frame wide: the demo's and the tests' picture."""
    return Scene("single", (Item(color, shape, (112, 112, 336, 336)),), f"The image shows a {color} {shape}.")


def probe_problems() -> list[ImageProblem]:
    """The colour and the shape question about every picture `render_shape` draws: the pictures the demo
    and the tests ask about, so a replica that passes them answers those questions right."""
    return [p for c in COLORS for s in SHAPES for p in scene_problems(shape_scene(c, s))]


def render_shape(color: str, shape: str, size: tuple[int, int] = (448, 448)) -> Any:
    """PIL image of one coloured shape in the middle of the picture."""
    return shape_scene(color, shape).render(size)
