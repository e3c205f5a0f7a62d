"""The evaluation suite: does an encoder give the same anatomy the same embedding, and does that help downstream?

Everything runs on held-out radiographs (`ace_hf.drr.build_heldout_dataset`: their own seed and wider poses,
never seen in pretraining) whose labels come exactly from the render geometry:

- property analysis, on frozen dense embeddings:
  - `anatomical_matching`: each patch is labelled with the fine structure under it (each rib, vertebra,
    lung lobe, ...); its cosine-nearest patch in another radiograph must cover the same structure
    (balanced accuracy over structures);
  - `landmark_matching`: the embedding at a landmark's exact position (a structure centroid projected
    through the render geometry) is looked up in another radiograph; the error is the pixel distance
    between the most similar patch and the landmark's true position there;
  - `view_correspondence`: in ACE's own two views, each small-view token must find the large-view token
    over the same cells.
  Radiographs are randomly cropped first, so that position embeddings alone cannot match anything.
- few-shot dense: anatomy segmentation with a linear head on frozen patch embeddings, and full fine-tuning,
  from k labelled radiographs; mean IoU on held-out renders.
- few-shot global: findings inserted into the CT before rendering (`ace_hf.findings`: nodule, pleural
  effusion, cardiomegaly), a linear probe on the frozen global embedding and full fine-tuning from k
  labelled radiographs; macro ROC-AUC.

Metrics go through `evaluate`, with the project's own metric modules (`ace_hf.metrics`), so nothing is
fetched from the Hub. Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .configuration_ace import IGNORE_INDEX, AceConfig
from .correspondence_ace import correspondence_targets
from .drr import build_heldout_dataset, dataset_info
from .image_processing_ace import AceImageProcessor
from .metrics import load_metric
from .modeling_ace import AceForImageClassification, AceForSemanticSegmentation, AceModel
from .sampling import draw

logger = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    """What the suite renders and runs. Defaults take a few minutes for the tiny preset on a 2-core CPU.

    Args:
        render_size: side of the held-out renders in pixels; None: the model's pretraining image
            (`grid_size * token_stride`), so that one token covers the same anatomy as in pretraining.
        num_anatomy_images: held-out renders for property analysis and segmentation.
        num_findings_images: held-out renders with findings for the global task.
        crop_fraction: side of the random crops of the property analysis, as a fraction of the render.
        matching_images: renders used for anatomical and landmark matching (all ordered pairs); None: all
            `num_anatomy_images`. Fewer renders make matching depend on which crops were drawn: with 24 (the
            default until 2026-11-26) the crops of two seeds moved the scores by 0.02 to 0.04 (docs/results.md).
        min_label_fraction: a patch gets a structure label when that structure covers at least this
            fraction of its pixels (else it is ignored).
        segmentation_shots, classification_shots: k labelled radiographs of the few-shot tasks.
        test_fraction: share of the renders held back as the few-shot test set.
        repeats: draws of the k training radiographs per (task, k); results are averaged.
        probe_steps, probe_learning_rate: full-batch AdamW training of the linear heads on frozen features.
        finetune_steps, finetune_learning_rate, finetune_batch_size: end-to-end fine-tuning (the head gets
            10x the encoder's learning rate). `finetune_steps=0` skips fine-tuning.
        finetune_repeats: how many of the `repeats` draws are also fine-tuned (fine-tuning costs far more
            than a linear head on cached features).
        batch_size: images per forward pass when extracting features.
        seed: seed of crops, few-shot draws and head initialization.
    """

    render_size: int | None = None
    num_anatomy_images: int = 64
    num_findings_images: int = 120
    crop_fraction: float = 0.7
    matching_images: int | None = None
    min_label_fraction: float = 0.5
    segmentation_shots: list[int] = field(default_factory=lambda: [1, 5, 20])
    classification_shots: list[int] = field(default_factory=lambda: [10, 40])
    test_fraction: float = 0.375
    repeats: int = 2
    probe_steps: int = 300
    probe_learning_rate: float = 1e-2
    finetune_steps: int = 40
    finetune_learning_rate: float = 1e-4
    finetune_batch_size: int = 4
    finetune_repeats: int = 1
    batch_size: int = 16
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"EvaluationConfig.crop_fraction={self.crop_fraction}: must be in (0, 1]")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"EvaluationConfig.test_fraction={self.test_fraction}: must be in (0, 1)")
        if self.matching_images is None:
            if self.num_anatomy_images < 2:
                raise ValueError(
                    f"EvaluationConfig.num_anatomy_images={self.num_anatomy_images}: matching needs at least 2 renders"
                )
            self.matching_images = self.num_anatomy_images
        if self.matching_images < 2 or self.matching_images > self.num_anatomy_images:
            raise ValueError(
                f"EvaluationConfig.matching_images={self.matching_images}: needs 2 <= it <= "
                f"num_anatomy_images={self.num_anatomy_images}"
            )


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


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------


def normalize_pixels(images: torch.Tensor, config: AceConfig) -> torch.Tensor:
    """[N, 1, H, W] windowed images in [0, 1] -> the model's normalized input (channels repeated)."""
    processor = AceImageProcessor(num_channels=config.num_channels)
    return (images.expand(-1, config.num_channels, -1, -1) - processor.image_mean) / processor.image_std


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


def patch_labels(label_maps: torch.Tensor, stride: int, min_fraction: float = 0.5) -> torch.Tensor:
    """Per-patch labels [N, h, w] of label maps [N, H, W]: the label covering at least `min_fraction` of the
    patch's pixels, else -1. Label 0 (nothing) is also -1: background patches are not anatomy."""
    n, height, width = label_maps.shape
    h, w = height // stride, width // stride
    patches = (
        label_maps[:, : h * stride, : w * stride].reshape(n, h, stride, w, stride).permute(0, 1, 3, 2, 4)
    )
    patches = patches.reshape(n, h, w, stride * stride)
    mode = patches.mode(dim=-1).values
    share = (patches == mode.unsqueeze(-1)).float().mean(-1)
    return torch.where((share >= min_fraction) & (mode > 0), mode, torch.full_like(mode, -1))


def random_crops(side: int, crop: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """Top-left corners of `count` random `crop x crop` boxes inside a `side x side` image."""
    corners = torch.randint(0, side - crop + 1, (count, 2), generator=generator)
    return [(int(top), int(left)) for top, left in corners]


# ----------------------------------------------------------------------------------------------------------------
# Property analysis
# ----------------------------------------------------------------------------------------------------------------


def _unit(features: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> L2-normalized tokens [N, h*w, C]."""
    return F.normalize(features.flatten(2).transpose(1, 2).double(), dim=-1)


def anatomical_matching(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-radiograph patch matching: for every labelled patch of image i and every other image j in which
    its structure is visible, does the cosine-nearest patch of j carry the same structure label?

    Args:
        features: [N, C, h, w] dense embeddings.
        labels: [N, h, w] structure per patch (-1: none).
    Returns:
        balanced_accuracy (mean over structures of the per-structure hit rate), accuracy, chance (the
        balanced hit rate of a uniformly random patch of j), position_only (the balanced accuracy of guessing
        the patch at the same place in j: what knowing only where a patch sits in its image scores),
        num_structures and num_queries.
    """
    tokens, flat = _unit(features), labels.flatten(1)
    predictions, references, chance, same_place = [], [], [], []
    for i in range(len(tokens)):
        for j in range(len(tokens)):
            if i == j:
                continue
            query = flat[i] >= 0
            query &= torch.isin(flat[i], flat[j][flat[j] >= 0])
            if not query.any():
                continue
            nearest = (tokens[i][query] @ tokens[j].T).argmax(-1)
            predictions.append(flat[j][nearest])
            same_place.append(flat[j][query])
            references.append(flat[i][query])
            chance.append((flat[i][query, None] == flat[j][None, :]).double().mean(-1))
    predictions, references, chance = torch.cat(predictions), torch.cat(references), torch.cat(chance)
    balanced_accuracy = load_metric("balanced_accuracy")
    scores = balanced_accuracy.compute(predictions=predictions, references=references)
    position_only = balanced_accuracy.compute(predictions=torch.cat(same_place), references=references)
    structures = references.unique()
    chance_per_structure = torch.stack([chance[references == s].mean() for s in structures])
    return {
        "balanced_accuracy": float(scores["balanced_accuracy"]),
        "accuracy": float((predictions == references).double().mean()),
        "chance": float(chance_per_structure.mean()),
        "position_only": float(position_only["balanced_accuracy"]),
        "num_structures": len(structures),
        "num_queries": len(references),
    }


def landmark_matching(
    features: torch.Tensor, landmarks: torch.Tensor, stride: int, margin: float | None = None
) -> dict[str, float]:
    """Landmark matching across radiographs with exact ground truth from the render geometry.

    The embedding at landmark p of image i (bilinear between tokens) is compared with every token of image
    j; the predicted position is the most similar token's centre, the error its pixel distance to p's true
    position in j. Landmarks closer than `margin` (default: one token) to a border of either image are
    skipped.

    Args:
        features: [N, C, h, w] dense embeddings of images whose pixels map 1:1 onto `landmarks`.
        landmarks: [N, P, 2] (row, col) in pixels, pixel centres at integers.
        stride: pixels per token.
    Returns:
        median and mean error in pixels, pck (share of errors within one token stride), the same errors
        for a position-only guess ("same pixel as in image i") as a reference, and the number of pairs.
    """
    n, _, h, w = features.shape
    margin = stride if margin is None else margin
    size = torch.tensor([h * stride, w * stride], dtype=torch.float32)
    inside = ((landmarks >= margin) & (landmarks <= size - 1 - margin)).all(-1)  # [N, P]
    tokens = _unit(features)
    centres = (
        torch.stack(torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij"), -1)
        .reshape(-1, 2)
        .float()
        + (stride - 1) / 2
    )
    # grid_sample coordinates of each landmark in token units (align_corners=False: token centres).
    grid = torch.stack(
        [(landmarks[..., 1] + 0.5) / (w * stride), (landmarks[..., 0] + 0.5) / (h * stride)], -1
    )
    queries = F.grid_sample(features.double(), (grid * 2 - 1)[:, None].double(), align_corners=False)[:, :, 0]
    queries = F.normalize(queries.transpose(1, 2), dim=-1)  # [N, P, C]
    errors, baseline = [], []
    for i in range(n):
        for j in range(n):
            both = inside[i] & inside[j]
            if i == j or not both.any():
                continue
            nearest = (queries[i][both] @ tokens[j].T).argmax(-1)
            errors.append((centres[nearest] - landmarks[j][both]).norm(dim=-1))
            baseline.append((landmarks[i][both] - landmarks[j][both]).norm(dim=-1))
    errors, baseline = torch.cat(errors), torch.cat(baseline)
    return {
        "median_error_px": float(errors.median()),
        "mean_error_px": float(errors.mean()),
        "pck": float((errors <= stride).float().mean()),
        "position_only_median_error_px": float(baseline.median()),
        "num_pairs": len(errors),
    }


def small_to_large_token(view_origins: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n*n]: for each small-view token, the index of the large-view token over it (both row-major).

    Small token (r, c) covers cell (R2 + r, C2 + c), which is cell (R2 - R1 + r, C2 - C1 + c) of the large
    view, whose tokens cover 2 x 2 cells: the large token is that cell // 2. Meaningful only for the small
    tokens inside the large view (`correspondence_targets(...).overlap_small`).
    """
    origins = view_origins.long()
    rows = torch.arange(n, device=origins.device).repeat_interleave(n)
    cols = torch.arange(n, device=origins.device).repeat(n)
    large_row = (origins[:, 2:3] + rows - origins[:, 0:1]) // 2
    large_col = (origins[:, 3:4] + cols - origins[:, 1:2]) // 2
    return large_row * n + large_col


@torch.no_grad()
def view_correspondence(
    model: AceModel, images: torch.Tensor, seed: int, batch_size: int = 16
) -> dict[str, float]:
    """ACE's own task on held-out radiographs: for each small-view token inside the overlap, is the
    cosine-nearest large-view token the one over the same cells? Views without photometric augmentation."""
    config = model.config
    processor = AceImageProcessor.from_ace_config(config)
    hits, total = 0, 0
    generator = torch.Generator().manual_seed(seed)
    n = config.view_tokens
    for start in range(0, len(images), batch_size):
        views = processor.sample_views(
            list(images[start : start + batch_size]), do_augment=False, generator=generator
        )
        large, _ = encode(model, _unnormalize(views["pixel_values_large"], processor), batch_size)
        small, _ = encode(model, _unnormalize(views["pixel_values_small"], processor), batch_size)
        targets = correspondence_targets(views["view_origins"], n)
        truth = small_to_large_token(views["view_origins"], n)
        nearest = torch.einsum("bsc,blc->bsl", _unit(small), _unit(large)).argmax(-1)
        valid = targets.overlap_small
        hits += int((nearest == truth)[valid].sum())
        total += int(valid.sum())
    return {"accuracy": hits / total, "chance": 1 / (n * n), "num_tokens": total}


def _unnormalize(pixels: torch.Tensor, processor: AceImageProcessor) -> torch.Tensor:
    """Back from the processor's normalized views to windowed [0, 1] images with one channel."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).reshape(-1, 1, 1)
    return (pixels * std + mean)[:, :1]


# ----------------------------------------------------------------------------------------------------------------
# Few-shot tasks
# ----------------------------------------------------------------------------------------------------------------


def _train_full_batch(
    head: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
) -> None:
    """Full-batch AdamW training of a head on frozen features (few-shot sets are small)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(head(inputs), targets).backward()
        optimizer.step()
    head.eval()


def _segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy of token logits upsampled to the label maps (the probe trains on label maps
    subsampled to 4 pixels per token side: the same optimum, 16x less work than at full resolution)."""
    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def _finetune(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """End-to-end AdamW fine-tuning of a task model; its head learns 10x faster than the encoder."""
    head = [p for name, p in model.named_parameters() if not name.startswith("ace.")]
    encoder = [p for name, p in model.named_parameters() if name.startswith("ace.")]
    optimizer = torch.optim.AdamW(
        [{"params": encoder, "lr": lr}, {"params": head, "lr": 10 * lr}], weight_decay=0.05
    )
    model.train()
    device = model.device
    for _ in range(steps):
        batch = torch.randperm(len(images), generator=generator)[:batch_size]
        pixels = normalize_pixels(images[batch], model.config).to(device)
        loss = model(pixel_values=pixels, labels=labels[batch].to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    logits = [
        model(
            pixel_values=normalize_pixels(images[s : s + batch_size], model.config).to(model.device)
        ).logits.cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(logits).float()


def _finetuned_logits(
    task: torch.nn.Module,
    encoder: AceModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    config: EvaluationConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Start a task model's encoder from `encoder`, fine-tune it end to end, and predict the test images."""
    task.ace.load_state_dict(encoder.state_dict())
    task.to(encoder.device)
    _finetune(
        task, images, labels, config.finetune_steps, config.finetune_learning_rate,
        config.finetune_batch_size, generator,
    )  # fmt: skip
    return _predict(task, test_images, config.batch_size)


def segmentation_scores(predictions: torch.Tensor, references: torch.Tensor, num_labels: int) -> float:
    """Mean IoU of label maps [N, H, W] through the project's `mean_iou` metric module."""
    scores = load_metric("mean_iou").compute(
        predictions=predictions.numpy(),
        references=references.numpy(),
        num_labels=num_labels,
        ignore_index=IGNORE_INDEX,
    )
    return float(scores["mean_iou"])


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro ROC-AUC over the columns of [N, F] scores and 0/1 labels, through the project's metric module."""
    metric = load_metric("roc_auc", config_name="multilabel")
    return float(
        metric.compute(prediction_scores=scores.tolist(), references=labels.int().tolist())["roc_auc"]
    )


def segmentation_fewshot(
    encoder: AceModel, data: HeldOutData, config: EvaluationConfig, progress: tqdm | None = None
) -> dict[str, float]:
    """Anatomy segmentation (background + groups) from k labelled radiographs: a linear head on frozen patch
    embeddings ("linear") and full fine-tuning ("finetune"); mean IoU on the held-out test renders."""
    num_labels = len(data.info["anatomy_labels"])
    num_test = max(1, round(len(data.images) * config.test_fraction))
    train_images, test_images = data.images[num_test:], data.images[:num_test]
    train_masks, test_masks = data.anatomy[num_test:], data.anatomy[:num_test]
    dense, _ = encode(encoder, data.images, config.batch_size)
    train_dense, test_dense = dense[num_test:], dense[:num_test]
    step = max(1, encoder.config.token_stride // 4)
    probe_masks = train_masks[:, step // 2 :: step, step // 2 :: step]
    results: dict[str, float] = {}
    for k in config.segmentation_shots:
        if k > len(train_images):
            raise ValueError(f"segmentation_shots k={k} exceeds the {len(train_images)} training renders")
        linear, finetuned = [], []
        for repeat in range(config.repeats):
            generator = torch.Generator().manual_seed(config.seed * 1000 + 10 * k + repeat)
            chosen = draw(len(train_images), k, generator)
            torch.manual_seed(config.seed + repeat)
            task = AceForSemanticSegmentation(_task_config(encoder.config, num_labels=num_labels))
            head = task.classifier
            _train_full_batch(
                head, train_dense[chosen], probe_masks[chosen], _segmentation_loss,
                config.probe_steps, config.probe_learning_rate,
            )  # fmt: skip
            with torch.no_grad():
                logits = F.interpolate(
                    head(test_dense), size=test_masks.shape[-2:], mode="bilinear", align_corners=False
                )
            linear.append(segmentation_scores(logits.argmax(1), test_masks, num_labels))
            if progress is not None:
                progress.update(1)
            if config.finetune_steps and repeat < config.finetune_repeats:
                logits = _finetuned_logits(
                    task, encoder, train_images[chosen], train_masks[chosen], test_images, config, generator
                )
                finetuned.append(segmentation_scores(logits.argmax(1), test_masks, num_labels))
                if progress is not None:
                    progress.update(1)
        results[f"linear_k{k}_miou"] = float(np.mean(linear))
        if finetuned:
            results[f"finetune_k{k}_miou"] = float(np.mean(finetuned))
    return results


def classification_fewshot(
    encoder: AceModel, data: HeldOutData, config: EvaluationConfig, progress: tqdm | None = None
) -> dict[str, float]:
    """Findings (multi-label) from k labelled radiographs: a linear probe on the frozen global embedding
    (logistic regression on standardized features) and full fine-tuning; macro ROC-AUC on the test renders."""
    labels = data.findings
    num_test = max(1, round(len(data.images) * config.test_fraction))
    train_images, test_images = data.images[num_test:], data.images[:num_test]
    train_labels, test_labels = labels[num_test:], labels[:num_test]
    _, pooled = encode(encoder, data.images, config.batch_size)
    mean, std = pooled[num_test:].mean(0), pooled[num_test:].std(0).clamp(min=1e-6)
    features = (pooled - mean) / std
    train_features, test_features = features[num_test:], features[:num_test]

    def both_classes(chosen: torch.Tensor) -> bool:
        column_sums = train_labels[chosen].sum(0)
        return bool(((column_sums > 0) & (column_sums < len(chosen))).all())

    results: dict[str, float] = {}
    for k in config.classification_shots:
        if k > len(train_images):
            raise ValueError(f"classification_shots k={k} exceeds the {len(train_images)} training renders")
        linear, finetuned = [], []
        for repeat in range(config.repeats):
            generator = torch.Generator().manual_seed(config.seed * 1000 + 10 * k + repeat + 500)
            chosen = draw(len(train_images), k, generator, both_classes)
            torch.manual_seed(config.seed + repeat)
            task = AceForImageClassification(
                _task_config(
                    encoder.config, num_labels=labels.shape[1], problem_type="multi_label_classification"
                )
            )
            head = task.classifier
            _train_full_batch(
                head, train_features[chosen], train_labels[chosen], F.binary_cross_entropy_with_logits,
                config.probe_steps, config.probe_learning_rate,
            )  # fmt: skip
            with torch.no_grad():
                linear.append(roc_auc(head(test_features), test_labels))
            if progress is not None:
                progress.update(1)
            if config.finetune_steps and repeat < config.finetune_repeats:
                logits = _finetuned_logits(
                    task, encoder, train_images[chosen], train_labels[chosen], test_images, config, generator
                )
                finetuned.append(roc_auc(logits, test_labels))
                if progress is not None:
                    progress.update(1)
        results[f"linear_k{k}_auc"] = float(np.mean(linear))
        if finetuned:
            results[f"finetune_k{k}_auc"] = float(np.mean(finetuned))
    return results


def _task_config(config: AceConfig, **task: Any) -> AceConfig:
    """The encoder's config for a task head (the encoder's own config object is left untouched)."""
    task_config = copy.deepcopy(config)
    for key, value in task.items():
        setattr(task_config, key, value)
    return task_config


# ----------------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------------


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


HEADLINE_METRICS = (
    ("anatomical matching (bal. acc.)", ("properties", "anatomical_matching", "balanced_accuracy")),
    ("landmark error (median px)", ("properties", "landmark_matching", "median_error_px")),
    ("landmark PCK@stride", ("properties", "landmark_matching", "pck")),
    ("view correspondence (acc.)", ("properties", "view_correspondence", "accuracy")),
)


def headline_rows(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(metric name, value) pairs of one encoder's results, in the order of the Markdown table."""
    rows = []
    for name, path in HEADLINE_METRICS:
        value: Any = results
        for key in path:
            value = value[key]
        rows.append((name, value))
    for task, unit in (("segmentation", "mIoU"), ("classification", "AUC")):
        for key, value in results[task].items():
            mode, shots, _ = key.split("_")
            rows.append((f"{task} {mode} {shots} ({unit})", value))
    return rows


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown table: a row per metric, a column per evaluated encoder."""
    names = list(results)
    table = {name: dict(headline_rows(result)) for name, result in results.items()}
    metrics = list(table[names[0]])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in metrics:
        cells = [_format(table[name].get(metric, math.nan)) for name in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    first = results[names[0]]["properties"]
    matching = first["anatomical_matching"]
    # results.json files written before the position-only reference existed still render (model cards).
    same_place = (
        f" (the same place in the other image: {matching['position_only']:.3f})"
        if "position_only" in matching
        else ""
    )
    lines.append("")
    lines.append(
        f"Chance: anatomical matching {matching['chance']:.3f} over "
        f"{matching['num_structures']} structures{same_place}; view correspondence "
        f"{first['view_correspondence']['chance']:.3f}; landmark error of a position-only guess "
        f"{first['landmark_matching']['position_only_median_error_px']:.1f} px; AUC 0.5."
    )
    return "\n".join(lines) + "\n"


def _format(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


__all__ = [
    "EvaluationConfig",
    "anatomical_matching",
    "classification_fewshot",
    "draw",
    "evaluate_encoder",
    "landmark_matching",
    "patch_labels",
    "results_markdown",
    "segmentation_fewshot",
    "small_to_large_token",
    "view_correspondence",
]
