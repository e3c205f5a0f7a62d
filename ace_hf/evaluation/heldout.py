"""Held-out radiographs as tensors, and the frozen embeddings every part of the suite starts from.

The renderer is imported inside `load_heldout` only: importing this module (or the report, or `ace_hf.hub`)
must not load the CT and its readers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configuration_ace import AceConfig
from ..image_processing_ace import AceImageProcessor
from ..modeling_ace import AceModel


@dataclass
class HeldOutData:
    """Held-out radiographs as tensors: windowed images in [0, 1], label maps, landmarks."""

    images: torch.Tensor  # [N, 1, S, S] float32
    structures: torch.Tensor  # [N, S, S] long, fine structure ids (0 = none)
    anatomy: torch.Tensor  # [N, S, S] long, anatomy groups (0 = background)
    landmarks: torch.Tensor  # [N, P, 2] float32 (row, col) in pixels
    findings: torch.Tensor | None  # [N, F] float32 0/1
    info: dict[str, Any] = field(default_factory=dict)


def load_heldout(
    num_images: int, render_size: int, with_findings: bool, cache_dir: str | None
) -> HeldOutData:
    """Render (once, cached) and load held-out radiographs as tensors."""
    from ..synthetic.datasets import build_heldout_dataset, dataset_info

    dataset = build_heldout_dataset(num_images, render_size, with_findings=with_findings, cache_dir=cache_dir)
    info = dataset_info(dataset)
    processor = AceImageProcessor(num_channels=1)

    def stack(column: str, convert: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        return torch.stack([convert(value) for value in dataset[column]])

    def as_long(image: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.int64))

    return HeldOutData(
        images=stack("image", processor.to_unit_float),
        structures=stack("structures", as_long),
        anatomy=stack("anatomy", as_long),
        landmarks=torch.tensor(dataset["landmarks"], dtype=torch.float32),
        findings=(
            torch.tensor([[row[name] for name in info["findings"]] for row in dataset], dtype=torch.float32)
            if with_findings
            else None
        ),
        info=info,
    )


def normalize_pixels(images: torch.Tensor, config: AceConfig) -> torch.Tensor:
    """[N, 1, H, W] windowed images in [0, 1] -> the model's normalized input (channels repeated)."""
    processor = AceImageProcessor(num_channels=config.num_channels)
    return (images.expand(-1, config.num_channels, -1, -1) - processor.image_mean) / processor.image_std


def unnormalize_pixels(pixels: torch.Tensor, processor: AceImageProcessor) -> torch.Tensor:
    """Back from the processor's normalized views to windowed [0, 1] images with one channel."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).reshape(-1, 1, 1)
    return (pixels * std + mean)[:, :1]


@torch.no_grad()
def encode(
    model: AceModel, images: torch.Tensor, batch_size: int = 16, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, C, h, w] and global [N, C] embeddings of windowed images [N, 1, H, W] (float32, CPU)."""
    model.eval()
    device = model.device
    dense, pooled = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=desc is None):
        pixels = normalize_pixels(images[start : start + batch_size], model.config).to(device)
        outputs = model(pixel_values=pixels)
        dense.append(outputs.patch_embeddings.float().cpu())
        pooled.append(outputs.pooler_output.float().cpu())
    return torch.cat(dense), torch.cat(pooled)
