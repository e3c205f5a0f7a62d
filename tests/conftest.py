"""Shared tiny configurations: every test model runs in milliseconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ace_hf import AceConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


TINY_HEADS = {"dino_hidden_dim": 32, "dino_bottleneck_dim": 16, "dino_out_dim": 64}


def tiny_vit_config(**overrides) -> AceConfig:
    fields = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "drop_path_rate": 0.0,
        "view_tokens": 4,
        "grid_size": 10,
        **TINY_HEADS,
    }
    return AceConfig(**{**fields, **overrides})


def tiny_swin_config(**overrides) -> AceConfig:
    fields = {
        "backbone_type": "swin",
        "image_size": 32,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "window_size": 4,
        "drop_path_rate": 0.0,
        "view_tokens": 4,
        "grid_size": 10,
        **TINY_HEADS,
    }
    return AceConfig(**{**fields, **overrides})


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread: faster on tiny tensors, and far faster on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
