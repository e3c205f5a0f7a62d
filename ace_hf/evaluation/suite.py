"""The evaluation suite: does an encoder give the same anatomy the same embedding, and does that help downstream?

Everything runs on held-out radiographs (`ace_hf.synthetic.datasets.build_heldout_dataset`: their own seed and
wider poses, never seen in pretraining) whose labels come exactly from the render geometry: property analysis
of the frozen dense embeddings on random crops (`properties`), then few-shot segmentation and findings
classification (`fewshot`).

Metrics go through `evaluate`, with the project's own metric modules (`ace_hf.metrics`), so nothing is
fetched from the Hub. Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

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


def evaluate_encoder(encoder: AceModel, config: EvaluationConfig | None = None) -> dict[str, Any]:
    """Run the whole suite on one encoder; returns a nested dict of results (JSON-serializable)."""
    config = config or EvaluationConfig()
    model_config = encoder.config
    stride = model_config.token_stride
    render_size = config.render_size or model_config.grid_size * stride
    anatomy = load_heldout(config.num_anatomy_images, render_size, False, config.cache_dir)
    findings = load_heldout(config.num_findings_images, render_size, True, config.cache_dir)
    fewshot_runs = config.repeats + (
        min(config.finetune_repeats, config.repeats) if config.finetune_steps else 0
    )
    progress = tqdm(
        total=3 + fewshot_runs * (len(config.segmentation_shots) + len(config.classification_shots)),
        desc="Evaluating",
        unit="task",
    )

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
    dense, _ = encode(encoder, crops, config.batch_size)
    properties = {
        "anatomical_matching": anatomical_matching(
            dense, patch_labels(structures, stride, config.min_label_fraction)
        ),
    }
    progress.update(1)
    properties["landmark_matching"] = landmark_matching(dense, landmarks, stride)
    progress.update(1)
    properties["view_correspondence"] = view_correspondence(
        encoder, anatomy.images, config.seed, config.batch_size
    )
    progress.update(1)

    segmentation = segmentation_fewshot(encoder, anatomy, config, progress)
    classification = classification_fewshot(encoder, findings, config, progress)
    progress.close()
    return {
        "properties": properties,
        "segmentation": segmentation,
        "classification": classification,
        "settings": {**asdict(config), "render_size": render_size, "crop_size": crop},
    }
