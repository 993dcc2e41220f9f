"""The order in which the streamed passes run their layers: one schedule that the real passes
(capture.iter_layers, capture.layer_sensitivity) and the preflight's store replay (job_plan) both walk,
so a change to the order is made once and the preflight cannot drift from the run.

Sensitivity: a forward pass over every decoder layer keeps the input of every k-th layer
(k = ceil(sqrt(layers))) as a checkpoint; the lm_head's gradient starts the backward pass; then, from the
top segment down, each segment's inputs are recomputed from its checkpoint and the gradient is carried
back through its layers one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Forward:
    """Run layers first..last-1 from the cached input of `first`; the input of layer i stays cached
    when (i - first) % keep_every == 0, the others are dropped once the next one exists."""

    first: int
    last: int
    keep_every: int

    def layers(self) -> Iterator[tuple[int, bool]]:
        """(layer, whether its input is dropped after it ran)."""
        for i in range(self.first, self.last):
            yield i, bool((i - self.first) % self.keep_every)


@dataclass(frozen=True)
class Head:
    """The answer loss at the top layer's output: the first gradient."""


@dataclass(frozen=True)
class Backward:
    """Carry the gradient from layer `layer`'s output to its input (none below layer 0)."""

    layer: int


Step = Forward | Head | Backward


def checkpoint_stride(num_layers: int) -> int:
    return max(1, math.ceil(math.sqrt(num_layers)))


def sensitivity_schedule(num_layers: int) -> list[Step]:
    k = checkpoint_stride(num_layers)
    steps: list[Step] = [Forward(0, num_layers, k), Head()]
    for first in reversed(range(0, num_layers, k)):
        last = min(first + k, num_layers)
        steps.append(Forward(first, last - 1, 1))  # the inputs of every layer of this segment
        steps.extend(Backward(i) for i in reversed(range(first, last)))
    return steps


def layers_run(steps: list[Step]) -> int:
    """Layer forward passes in a schedule (the progress bar's total; backward steps included)."""
    return sum(s.last - s.first for s in steps if isinstance(s, Forward)) + sum(
        isinstance(s, Backward) for s in steps
    )
