"""The evaluation suite: does an encoder give the same anatomy the same embedding, and does that help downstream?

Everything runs on held-out radiographs (`ace_hf.synthetic.datasets.build_heldout_dataset`: their own seed and
wider poses, never seen in pretraining) whose labels come exactly from the render geometry: property analysis
of the frozen dense embeddings on random crops (`properties`), then few-shot segmentation and findings
classification (`fewshot`).

Metrics go through `evaluate`, with the project's own metric modules (`ace_hf.metrics`), so nothing is
fetched from the Hub. Each task shows a progress bar named "[i/5] task" that says what it is doing, and the
log gives each task's wall time. Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch

from ..modeling_ace import AceModel
from .config import EvaluationConfig
from .fewshot import classification_fewshot, segmentation_fewshot
from .heldout import encode, load_heldout
from .properties import (
    anatomical_matching,
    landmark_matching,
    patch_labels,
    random_crops,
    view_correspondence,
)

logger = logging.getLogger(__name__)

TASKS = (
    "anatomical matching",
    "landmark matching",
    "view correspondence",
    "few-shot segmentation",
    "few-shot findings",
)


@contextmanager
def timed_task(name: str) -> Iterator[str]:
    """The task's progress-bar description ("[i/5] name"), and its wall time in the log when it ends."""
    desc = f"[{TASKS.index(name) + 1}/{len(TASKS)}] {name}"
    start = time.perf_counter()
    yield desc
    logger.info(f"{desc}: {time.perf_counter() - start:.1f} s")


def evaluate_encoder(encoder: AceModel, config: EvaluationConfig | None = None) -> dict[str, Any]:
    """Run the whole suite on one encoder; returns a nested dict of results (JSON-serializable)."""
    config = config or EvaluationConfig()
    model_config = encoder.config
    stride = model_config.token_stride
    render_size = config.render_size or model_config.grid_size * stride
    anatomy = load_heldout(config.num_anatomy_images, render_size, False, config.cache_dir)
    findings = load_heldout(config.num_findings_images, render_size, True, config.cache_dir)

    # Property analysis on random crops of the matching renders.
    crop = max(stride, round(config.crop_fraction * render_size / stride) * stride)
    generator = torch.Generator().manual_seed(config.seed)
    corners = random_crops(render_size, crop, config.matching_images, generator)
    crops = torch.stack(
        [anatomy.images[i, :, top : top + crop, left : left + crop] for i, (top, left) in enumerate(corners)]
    )
    structures = torch.stack(
        [anatomy.structures[i, top : top + crop, left : left + crop] for i, (top, left) in enumerate(corners)]
    )
    landmarks = torch.stack(
        [
            anatomy.landmarks[i] - torch.tensor([top, left], dtype=torch.float32)
            for i, (top, left) in enumerate(corners)
        ]
    )
    properties: dict[str, Any] = {}
    with timed_task("anatomical matching") as desc:
        dense, _ = encode(encoder, crops, config.batch_size, desc=f"{desc}: encoding crops")
        labels = patch_labels(structures, stride, config.min_label_fraction)
        properties["anatomical_matching"] = anatomical_matching(dense, labels, desc=desc)
    with timed_task("landmark matching") as desc:
        properties["landmark_matching"] = landmark_matching(dense, landmarks, stride, desc=desc)
    with timed_task("view correspondence") as desc:
        properties["view_correspondence"] = view_correspondence(
            encoder, anatomy.images, config.seed, config.batch_size, desc=desc
        )
    with timed_task("few-shot segmentation") as desc:
        segmentation = segmentation_fewshot(encoder, anatomy, config, desc)
    with timed_task("few-shot findings") as desc:
        classification = classification_fewshot(encoder, findings, config, desc)
    return {
        "properties": properties,
        "segmentation": segmentation,
        "classification": classification,
        "settings": {**asdict(config), "render_size": render_size, "crop_size": crop},
    }
