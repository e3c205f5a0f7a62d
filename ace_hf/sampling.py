"""Seeded draws of few-shot training sets, shared by fine-tuning and the evaluation suite.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def draw(
    pool: int, k: int, generator: torch.Generator, valid: Callable[[torch.Tensor], bool] | None = None
) -> torch.Tensor:
    """k random indices of a pool of training images (redrawn until `valid` accepts them, at most 100 times)."""
    for _ in range(100):
        chosen = torch.randperm(pool, generator=generator)[:k]
        if valid is None or valid(chosen):
            return chosen
    raise ValueError(f"No draw of {k} training images satisfies the task's requirements")
