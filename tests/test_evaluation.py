"""The evaluation suite: each metric scores known-good features high and random ones at chance, the ground
truth it uses is exact, and the suite (and its command line) runs end to end on a tiny encoder."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ace_hf import (
    AceForPreTraining,
    AceImageProcessor,
    AceModel,
    correspondence_targets,
    sample_view_origins,
)
from ace_hf.evaluation import properties
from ace_hf.evaluation.arguments import BASELINE_COLUMN, EvaluationArguments
from ace_hf.evaluation.baseline import (
    WIDTH,
    PixelEncoder,
    baseline_description,
    context_descriptor,
)
from ace_hf.evaluation.cli import main, parse_args
from ace_hf.evaluation.config import FULL_SUITE, QUICK_SUITE, EvaluationConfig
from ace_hf.evaluation.fewshot import classification_fewshot, segmentation_fewshot
from ace_hf.evaluation.heldout import HeldOutData, encode, normalize_pixels, unnormalize_pixels
from ace_hf.evaluation.properties import (
    anatomical_matching,
    landmark_matching,
    patch_labels,
    small_to_large_token,
    view_correspondence,
)
from ace_hf.evaluation.report import results_markdown
from ace_hf.evaluation.run import load_encoders
from ace_hf.evaluation.suite import evaluate_encoder
from ace_hf.sampling import draw
from tests.conftest import tiny_vit_config
from tests.test_extract_features import assert_one_error_line, run_command

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parent.parent
STRIDE = 8
LEVELS = 8  # the oracle images carry integer token values v as pixel value v / LEVELS


# ------------------------------------------------------------------------------------------------------------
# patch_labels
# ------------------------------------------------------------------------------------------------------------

# 5 x 7 map, stride 2: 2 x 3 patches; the last row and column (9) are outside every whole patch.
HAND_MAP = torch.tensor(
    [
        [3, 3, 0, 0, 4, 4, 9],
        [3, 1, 0, 5, 5, 6, 9],
        [7, 7, 0, 5, 1, 2, 9],
        [7, 7, 5, 5, 3, 2, 9],
        [9, 9, 9, 9, 9, 9, 9],
    ]
)


@pytest.mark.parametrize(
    ("min_fraction", "expected"),
    [
        (0.5, [[3, -1, 4], [7, 5, 2]]),
        (0.6, [[3, -1, -1], [7, 5, -1]]),
        (0.75, [[3, -1, -1], [7, 5, -1]]),
        (0.8, [[-1, -1, -1], [7, -1, -1]]),
    ],
)
def test_patch_labels_takes_the_majority_of_each_patch(min_fraction: float, expected: list) -> None:
    """Majority label if it covers >= min_fraction of the patch, background (0) and partial patches never."""
    maps = torch.stack([HAND_MAP, torch.full_like(HAND_MAP, 6)])
    labels = patch_labels(maps, stride=2, min_fraction=min_fraction)
    assert labels.shape == (2, 2, 3)
    assert labels[0].tolist() == expected
    assert labels[1].tolist() == [[6, 6, 6], [6, 6, 6]]


def test_patch_labels_matches_a_pixel_loop_on_random_maps() -> None:
    """Pixel-exact on random non-square maps: patch (r, c) is pixels [r*s, (r+1)*s) x [c*s, (c+1)*s)."""
    generator = torch.Generator().manual_seed(0)
    stride = 3
    # Blocky maps with one random pixel per 2 x 2 changed: most patches have a clear majority.
    maps = (
        torch.randint(0, 4, (3, 9, 11), generator=generator).repeat_interleave(2, 1).repeat_interleave(2, 2)
    )
    maps = torch.where(torch.rand(maps.shape, generator=generator) < 0.2, 4, maps)[:, :17, :22]
    labels = patch_labels(maps, stride, min_fraction=0.5)
    assert labels.shape == (3, 5, 7)
    checked = 0
    for n in range(3):
        for r in range(5):
            for c in range(7):
                counts = torch.bincount(maps[n, r * 3 : r * 3 + 3, c * 3 : c * 3 + 3].flatten(), minlength=5)
                top = counts.max()
                if (counts == top).sum() > 1:
                    continue  # a tie: either label is right
                label = int(counts.argmax())
                want = label if label > 0 and top >= 0.5 * 9 else -1
                assert labels[n, r, c] == want, (n, r, c)
                checked += 1
    assert checked > 80


# ------------------------------------------------------------------------------------------------------------
# anatomical_matching
# ------------------------------------------------------------------------------------------------------------

# Patch labels: -1 (none) and structures 1..5 with unequal frequencies, so chance is not 1 / structures.
LABEL_PROBABILITIES = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.05, 0.05])


def random_patch_labels(count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    draws = torch.multinomial(LABEL_PROBABILITIES, count * side * side, replacement=True, generator=generator)
    return draws.reshape(count, side, side) - 1


def label_features(labels: torch.Tensor, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """One-hot of each patch's label (unlabelled patches share a channel) plus small Gaussian noise."""
    onehot = F.one_hot(labels + 1, 8).permute(0, 3, 1, 2).float()
    return onehot + noise * torch.randn(onehot.shape, generator=generator)


def test_anatomical_matching_scores_label_features_perfectly() -> None:
    """Features that carry the structure label find the same structure in every other radiograph."""
    generator = torch.Generator().manual_seed(0)
    labels = random_patch_labels(6, 10, generator)
    scores = anatomical_matching(label_features(labels, generator), labels)
    assert scores["balanced_accuracy"] > 0.95 and scores["accuracy"] > 0.95
    assert scores["num_structures"] == 5


def test_anatomical_matching_scores_random_features_at_chance() -> None:
    """Random features hit at the returned chance rate, which follows the structures' frequencies.

    With 8 images of 12 x 12 patches there are ~5600 queries, ~270 for the rarest structure: the standard
    error of the balanced accuracy is ~0.01 (measured over seeds), so 0.05 is a 5-sigma bound. The chance
    of structure s is its patch frequency p_s, so the returned chance must be mean(p_s) = 0.14, not 1/5.
    """
    generator = torch.Generator().manual_seed(1)
    labels = random_patch_labels(8, 12, generator)
    scores = anatomical_matching(torch.randn(8, 64, 12, 12, generator=generator), labels)
    assert scores["chance"] == pytest.approx(float(LABEL_PROBABILITIES[1:].mean()), abs=0.02)
    assert abs(scores["balanced_accuracy"] - scores["chance"]) < 0.05
    assert scores["num_queries"] > 5000


def test_anatomical_matching_skips_structures_absent_from_the_target() -> None:
    """A query whose structure is not visible in the other radiograph counts neither as hit nor miss; the
    counts and the chance rate are checked by hand."""
    first = torch.full((4, 4), -1)
    first.view(-1)[:6] = 1  # structure 1 on 6 patches
    first.view(-1)[6:10] = 2  # structure 2 (absent from the second image) on 4
    second = torch.full((4, 4), -1)
    second.view(-1)[-5:] = 1  # structure 1 on 5 patches
    labels = torch.stack([first, second])
    scores = anatomical_matching(label_features(labels, torch.Generator().manual_seed(0)), labels)
    assert scores["num_queries"] == 6 + 5
    assert scores["num_structures"] == 1
    assert scores["balanced_accuracy"] == 1.0
    # 6 queries see 5/16 of the target as structure 1, 5 queries see 6/16.
    assert scores["chance"] == pytest.approx((6 * 5 / 16 + 5 * 6 / 16) / 11)


def test_anatomical_matching_position_only_reference_counts_same_place_hits() -> None:
    """Structure 1 sits on row 0 of both radiographs, structure 2 on row 1 of one and row 2 of the other:
    guessing the same place hits every structure-1 query and no structure-2 query, 0.5 balanced."""
    first, second = torch.full((4, 4), -1), torch.full((4, 4), -1)
    first[0], second[0] = 1, 1
    first[1], second[2] = 2, 2
    labels = torch.stack([first, second])
    scores = anatomical_matching(label_features(labels, torch.Generator().manual_seed(0)), labels)
    assert scores["balanced_accuracy"] == 1.0
    assert scores["position_only"] == 0.5


# ------------------------------------------------------------------------------------------------------------
# landmark_matching
# ------------------------------------------------------------------------------------------------------------


def positional_features(
    offsets: torch.Tensor, side: int, periods=(400.0, 200.0, 100.0, 50.0)
) -> torch.Tensor:
    """Dense features of `side`-pixel windows at `offsets` (row, col) of one canvas: sin/cos of the canvas
    coordinates of each token centre. Their cosine similarity peaks where the canvas positions coincide
    (the longest period exceeds twice every distance), so the right match is known."""
    count, tokens = len(offsets), side // STRIDE
    centres = torch.arange(tokens) * STRIDE + (STRIDE - 1) / 2
    rows, cols = centres[None] + offsets[:, :1], centres[None] + offsets[:, 1:]
    channels = []
    for period in periods:
        for wave in (torch.sin, torch.cos):
            channels.append(wave(2 * math.pi / period * rows)[:, :, None].expand(count, tokens, tokens))
            channels.append(wave(2 * math.pi / period * cols)[:, None, :].expand(count, tokens, tokens))
    return torch.stack(channels, 1)


def inside_pairs(landmarks: torch.Tensor, side: int, margin: float) -> list[tuple[int, int, torch.Tensor]]:
    """(i, j, mask) of the ordered image pairs and the landmarks at least `margin` from both borders."""
    inside = ((landmarks >= margin) & (landmarks <= side - 1 - margin)).all(-1)
    return [
        (i, j, inside[i] & inside[j])
        for i in range(len(landmarks))
        for j in range(len(landmarks))
        if i != j and (inside[i] & inside[j]).any()
    ]


def test_landmark_matching_finds_the_nearest_token_with_positional_features() -> None:
    """Translated windows of one canvas with a positional code: every landmark lands on the token nearest its
    true position, so the errors are exactly the distances to the nearest token centres (<= stride / sqrt 2);
    the position-only reference is the translation between the images."""
    generator = torch.Generator().manual_seed(0)
    side = 96
    offsets = torch.rand(6, 2, generator=generator) * 60
    canvas_points = torch.rand(40, 2, generator=generator) * 150
    landmarks = canvas_points[None] - offsets[:, None]
    scores = landmark_matching(positional_features(offsets, side), landmarks, STRIDE)

    best, position_only = [], []
    for i, j, both in inside_pairs(landmarks, side, margin=STRIDE):
        target = landmarks[j][both]
        nearest = ((target - (STRIDE - 1) / 2) / STRIDE).round().clamp(0, side // STRIDE - 1)
        best.append((nearest * STRIDE + (STRIDE - 1) / 2 - target).norm(dim=-1))
        position_only.append((landmarks[i][both] - target).norm(dim=-1))
    best, position_only = torch.cat(best), torch.cat(position_only)
    assert scores["num_pairs"] == len(best) > 100
    assert scores["mean_error_px"] == pytest.approx(float(best.mean()), abs=1e-4)
    assert scores["median_error_px"] == pytest.approx(float(best.median()), abs=1e-4)
    assert scores["median_error_px"] <= STRIDE and scores["pck"] == 1.0
    assert scores["position_only_median_error_px"] == pytest.approx(float(position_only.median()), abs=1e-4)

    random = landmark_matching(torch.randn(6, 32, 12, 12, generator=generator), landmarks, STRIDE)
    assert random["median_error_px"] > 3 * STRIDE and random["pck"] < 0.2


def test_landmark_matching_is_exact_at_token_centres() -> None:
    """Landmarks on token centres of windows shifted by whole tokens: zero error (a half-pixel slip of the
    token centres or of the landmark sampling would show)."""
    generator = torch.Generator().manual_seed(1)
    offsets = torch.tensor([[0, 0], [8, 16], [24, 8], [16, 32], [40, 40]], dtype=torch.float32)
    canvas_points = torch.randint(0, 20, (30, 2), generator=generator) * STRIDE + (STRIDE - 1) / 2
    landmarks = canvas_points[None] - offsets[:, None]
    scores = landmark_matching(positional_features(offsets, 96), landmarks, STRIDE)
    assert scores["num_pairs"] > 50
    assert scores["median_error_px"] == 0.0 and scores["mean_error_px"] < 1e-4 and scores["pck"] == 1.0


def test_landmark_matching_skips_landmarks_near_or_beyond_the_border() -> None:
    """A landmark counts for a pair only if it lies `margin` (default: one stride) inside both images."""
    landmarks = torch.tensor(
        [
            [[30.0, 30.0], [3.0, 30.0], [30.0, 30.0]],  # image 0: landmark 1 within 8 px of the top
            [[30.0, 30.0], [30.0, 30.0], [30.0, 60.0]],  # image 1: landmark 2 within 8 px of the right
            [[30.0, 30.0], [30.0, 30.0], [-5.0, 30.0]],  # image 2: landmark 2 outside
        ]
    )
    features = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    # Default margin 8: landmark 0 in all 6 ordered pairs, landmark 1 in images {1, 2} (2 pairs), landmark 2
    # in image 0 only. Margin 2: landmark 1 everywhere (6), landmark 2 in images {0, 1} (2).
    assert landmark_matching(features, landmarks, STRIDE)["num_pairs"] == 6 + 2
    assert landmark_matching(features, landmarks, STRIDE, margin=2)["num_pairs"] == 6 + 6 + 2


# ------------------------------------------------------------------------------------------------------------
# view_correspondence
# ------------------------------------------------------------------------------------------------------------


def test_small_to_large_token_agrees_with_the_decomposition_targets() -> None:
    """The truth of view_correspondence is the peak of the decomposition target (the large view's 2n x 2n
    sub-token grid), divided by 2: for every small-view token inside the large view."""
    n = 4
    origins = sample_view_origins(256, 10, n, 0.25, generator=torch.Generator().manual_seed(0))
    targets = correspondence_targets(origins, n)
    peak = targets.decomposition.argmax(-1)  # [B, n*n] on the 2n x 2n grid
    expected = (peak // (2 * n) // 2) * n + (peak % (2 * n)) // 2
    truth = small_to_large_token(origins, n)
    assert truth.shape == (256, n * n)
    assert torch.equal(truth[targets.overlap_small], expected[targets.overlap_small])
    assert targets.overlap_small.float().mean() < 0.9  # partly overlapping pairs were exercised


def test_small_to_large_token_covers_the_small_token_pixels() -> None:
    """Pixel-exact against the processor's real views: the large-view token named by the truth shows the
    same image area around the small token (row and column ramps, block means = block centres)."""
    config = tiny_vit_config()
    n, cell = config.view_tokens, config.token_stride
    processor = AceImageProcessor.from_ace_config(config)
    side = config.grid_size * cell
    ramp = (torch.arange(side, dtype=torch.float32) + 0.5) / side

    def views(image: torch.Tensor) -> dict:
        generator = torch.Generator().manual_seed(3)
        return processor.sample_views([image] * 8, do_augment=False, do_jitter=False, generator=generator)

    centres = []
    for image in (ramp[None, :, None].expand(1, side, side), ramp[None, None, :].expand(1, side, side)):
        batch = views(image)
        large = unnormalize_pixels(batch["pixel_values_large"], processor)
        small = unnormalize_pixels(batch["pixel_values_small"], processor)
        # Block means in original pixels: large tokens cover 2 x 2 cells (half resolution), small ones 1.
        centres.append(
            (
                F.avg_pool2d(large, cell).flatten(1) * side - 0.5,
                F.avg_pool2d(small, cell).flatten(1) * side - 0.5,
            )
        )
    origins = batch["view_origins"]
    truth = small_to_large_token(origins, n)
    valid = correspondence_targets(origins, n).overlap_small
    assert valid.sum() > 50
    for large, small in centres:  # rows, then columns
        under = large.gather(1, truth.clamp(0, n * n - 1))
        # A small token's cell is one quadrant of the 2 x 2 cells of its large token: half a cell away.
        torch.testing.assert_close(
            (under - small).abs()[valid], torch.full_like(small[valid], cell / 2), atol=1e-3, rtol=0
        )


def test_view_correspondence_is_perfect_for_an_oracle_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting and truth together: each image cell has its own grey level; an oracle embeds a token as the
    histogram of grey levels under it, so a small token matches exactly the large token over its cell.
    Jitter is switched off (it resamples and would blur the cells; the geometry holds either way)."""
    config = tiny_vit_config()
    cell, side = config.token_stride, config.grid_size * config.token_stride
    generator = torch.Generator().manual_seed(0)
    levels = torch.stack([torch.randperm(config.grid_size**2, generator=generator) for _ in range(6)]) + 20
    images = (levels.reshape(6, 1, config.grid_size, config.grid_size) / 128.0).repeat_interleave(cell, 2)
    images = images.repeat_interleave(cell, 3)
    assert images.shape == (6, 1, side, side)

    def oracle_encode(model, pixels: torch.Tensor, batch_size: int = 16, desc=None):
        histogram = F.one_hot((pixels[:, 0] * 128).round().long(), 128).permute(0, 3, 1, 2).float()
        return F.avg_pool2d(histogram, cell), None

    sample_views = AceImageProcessor.sample_views
    monkeypatch.setattr(
        AceImageProcessor,
        "sample_views",
        lambda self, images, **kwargs: sample_views(self, images, **{**kwargs, "do_jitter": False}),
    )
    monkeypatch.setattr(properties, "encode", oracle_encode)
    scores = view_correspondence(SimpleNamespace(config=config), images, seed=0, batch_size=4)
    processor = AceImageProcessor.from_ace_config(config)
    generator = torch.Generator().manual_seed(0)  # replays the origin draws of view_correspondence
    expected = 0
    for start in range(0, len(images), 4):
        origins = sample_views(
            processor, list(images[start : start + 4]), do_augment=False, do_jitter=False, generator=generator
        )["view_origins"]
        expected += int(correspondence_targets(origins, config.view_tokens).overlap_small.sum())
    assert scores["num_tokens"] == expected > 0
    assert scores["accuracy"] == 1.0


def test_view_correspondence_of_a_random_encoder_is_a_rate() -> None:
    """A tiny random AceModel on random images: accuracy in [0, 1], chance 1 / n^2."""
    config = tiny_vit_config()
    images = torch.rand(5, 1, 80, 80, generator=torch.Generator().manual_seed(0))
    scores = view_correspondence(AceModel(config), images, seed=0, batch_size=4)
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert scores["chance"] == 1 / config.view_tokens**2
    assert scores["num_tokens"] > 0


# ------------------------------------------------------------------------------------------------------------
# Few-shot tasks
# ------------------------------------------------------------------------------------------------------------


class OracleEncoder(torch.nn.Module):
    """Stands in for AceModel on images whose tokens carry integer values v (pixels v / LEVELS): the dense
    embedding of a token is the one-hot of v, the global embedding the list of token values."""

    def __init__(self) -> None:
        super().__init__()
        self.config = tiny_vit_config()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        processor = AceImageProcessor(num_channels=self.config.num_channels)
        pixels = pixel_values[:, :1] * processor.image_std + processor.image_mean
        values = (F.avg_pool2d(pixels, self.config.token_stride)[:, 0] * LEVELS).round().long()
        width = self.config.feature_dim
        return SimpleNamespace(
            patch_embeddings=F.one_hot(values, width).permute(0, 3, 1, 2).float(),
            pooler_output=F.pad(values.flatten(1).float(), (0, width - values[0].numel())),
        )


def block_maps(count: int, side: int, block: int, labels: int, generator: torch.Generator) -> torch.Tensor:
    blocks = torch.randint(0, labels, (count, side // block, side // block), generator=generator)
    return blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)


def test_matching_uses_every_anatomy_render_unless_told_otherwise() -> None:
    assert EvaluationConfig(num_anatomy_images=10).matching_images == 10
    assert EvaluationConfig(num_anatomy_images=10, matching_images=4).matching_images == 4
    for bad in (1, 11):
        with pytest.raises(ValueError, match="matching_images"):
            EvaluationConfig(num_anatomy_images=10, matching_images=bad)
    with pytest.raises(ValueError, match="num_anatomy_images=1: matching needs at least 2"):
        EvaluationConfig(num_anatomy_images=1)


def fewshot_config(**overrides) -> EvaluationConfig:
    fields = {
        "num_anatomy_images": 12,
        "matching_images": 2,
        "test_fraction": 0.5,
        "repeats": 2,
        "probe_steps": 100,
        "finetune_steps": 0,
        "batch_size": 8,
        **overrides,
    }
    return EvaluationConfig(**fields)


def anatomy_data(images_from: torch.Tensor, anatomy: torch.Tensor) -> HeldOutData:
    return HeldOutData(
        images=(images_from[:, None].float() / LEVELS),
        structures=anatomy,
        anatomy=anatomy,
        landmarks=torch.zeros(len(anatomy), 0, 2),
        findings=None,
        info={"anatomy_labels": ["background", "a", "b", "c"]},
    )


def findings_data(images_from: torch.Tensor, findings: torch.Tensor) -> HeldOutData:
    """32 x 32 images whose first token row carries `images_from` (one 0/1 value per token)."""
    tokens = torch.zeros(len(findings), 4, 4)
    tokens[:, 0, : images_from.shape[1]] = images_from
    images = (tokens / LEVELS).repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2)[:, None]
    return HeldOutData(
        images=images,
        structures=torch.zeros(len(findings), 32, 32, dtype=torch.long),
        anatomy=torch.zeros(len(findings), 32, 32, dtype=torch.long),
        landmarks=torch.zeros(len(findings), 0, 2),
        findings=findings,
        info={"findings": ["nodule", "pleural_effusion", "cardiomegaly"]},
    )


def test_segmentation_fewshot_oracle_scores_high_and_unrelated_features_low() -> None:
    """Features carrying the label map give a linear probe mIoU near 1 (label blocks of 2 x 2 tokens, so
    only block edges are blurred by the upsampling); features of an unrelated map stay near chance."""
    generator = torch.Generator().manual_seed(0)
    anatomy = block_maps(12, 64, 16, 4, generator)
    config = fewshot_config(segmentation_shots=[1, 3])
    oracle = segmentation_fewshot(OracleEncoder(), anatomy_data(anatomy, anatomy), config)
    assert set(oracle) == {"linear_k1_miou", "linear_k3_miou"}
    assert min(oracle.values()) > 0.9
    unrelated = block_maps(12, 64, 16, 4, generator)
    blind = segmentation_fewshot(OracleEncoder(), anatomy_data(unrelated, anatomy), config)
    assert max(blind.values()) < 0.35  # chance: ~0.14 for 4 balanced classes


def test_classification_fewshot_oracle_scores_high_and_unrelated_features_at_chance() -> None:
    """A probe on global embeddings that carry the findings gets AUC 1; on unrelated bits ~0.5 (20 test
    images, 3 findings: the AUC's standard error is ~0.06, so 0.25 is a 4-sigma bound)."""
    generator = torch.Generator().manual_seed(0)
    findings = (torch.rand(40, 3, generator=generator) < 0.5).float()
    config = fewshot_config(classification_shots=[4, 10])
    oracle = classification_fewshot(OracleEncoder(), findings_data(findings, findings), config)
    assert set(oracle) == {"linear_k4_auc", "linear_k10_auc"}
    assert min(oracle.values()) > 0.95
    unrelated = (torch.rand(40, 3, generator=generator) < 0.5).float()
    blind = classification_fewshot(OracleEncoder(), findings_data(unrelated, findings), config)
    assert all(abs(value - 0.5) < 0.25 for value in blind.values()), blind


def test_fewshot_tasks_on_a_tiny_encoder_report_every_score_in_range() -> None:
    """Linear probes and fine-tuning of a tiny random AceModel: one key per (mode, k), values in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    anatomy = block_maps(8, 32, 8, 4, generator)
    findings = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]] * 2, dtype=torch.float32)
    data = HeldOutData(
        images=torch.rand(8, 1, 32, 32, generator=generator),
        structures=anatomy,
        anatomy=anatomy,
        landmarks=torch.zeros(8, 0, 2),
        findings=findings,
        info={"anatomy_labels": ["background", "a", "b", "c"], "findings": ["x", "y", "z"]},
    )
    config = fewshot_config(
        num_anatomy_images=8, segmentation_shots=[1, 2], classification_shots=[4], repeats=1,
        probe_steps=5, finetune_steps=1, finetune_batch_size=2,
    )  # fmt: skip
    encoder = AceModel(tiny_vit_config())
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    segmentation = segmentation_fewshot(encoder, data, config)
    classification = classification_fewshot(encoder, data, config)
    assert set(segmentation) == {f"{mode}_k{k}_miou" for mode in ("linear", "finetune") for k in (1, 2)}
    assert set(classification) == {"linear_k4_auc", "finetune_k4_auc"}
    assert all(0.0 <= value <= 1.0 for value in (*segmentation.values(), *classification.values()))
    for key, value in encoder.state_dict().items():  # fine-tuning trains a copy
        assert torch.equal(value, before[key]), key


def test_draw_and_fewshot_refuse_impossible_requests() -> None:
    """draw gives k distinct indices that `valid` accepts, else ValueError; a finding absent from every
    training render cannot give a both-class draw; k above the training pool is refused."""
    generator = torch.Generator().manual_seed(0)
    chosen = draw(10, 4, generator, lambda c: bool((c < 5).all()))
    assert len(set(chosen.tolist())) == 4 and bool((chosen < 5).all())
    with pytest.raises(ValueError, match="No draw of 3"):
        draw(10, 3, generator, lambda c: False)

    findings = torch.tensor([[1, 0, 1], [0, 1, 0]] * 4, dtype=torch.float32)
    findings[4:, 2] = 0  # the training half never shows the third finding
    config = fewshot_config(classification_shots=[2], repeats=1, probe_steps=1)
    with pytest.raises(ValueError, match="No draw"):
        classification_fewshot(OracleEncoder(), findings_data(findings, findings), config)
    with pytest.raises(ValueError, match="exceeds the 4 training renders"):
        classification_fewshot(OracleEncoder(), findings_data(findings, findings), fewshot_config(
            classification_shots=[5], repeats=1, probe_steps=1))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# The pixel baseline
# ------------------------------------------------------------------------------------------------------------

# 8 x 8 pixels, tokens of 4 x 4: token (0, 0) is 0, token (0, 1) counts 0/16 ... 15/16 row by row (mean
# 7.5/16 = 0.46875), token (1, 0) is 1, token (1, 1) is 0.5. Token means: [[0, 0.46875], [1, 0.5]].
HAND_IMAGE = torch.zeros(1, 1, 8, 8)
HAND_IMAGE[0, 0, :4, 4:] = torch.arange(16.0).reshape(4, 4) / 16
HAND_IMAGE[0, 0, 4:, :4] = 1.0
HAND_IMAGE[0, 0, 4:, 4:] = 0.5


def centred_unit(values: list[float]) -> torch.Tensor:
    vector = torch.tensor(values)
    vector = vector - vector.mean()
    return vector / vector.norm()


def test_context_descriptor_of_a_hand_made_image() -> None:
    """Own pixels (4 x 4, row-major), then the 3 x 3 token means around the token (row-major, the border
    tokens repeated outside the image), centred and L2-normalized."""
    features = context_descriptor(HAND_IMAGE, stride=4, radius=1)
    assert features.shape == (1, 16 + 9, 2, 2)
    own = [v / 16 for v in range(16)]
    context = [0, 0.46875, 0.46875, 0, 0.46875, 0.46875, 1, 0.5, 0.5]  # rows -1, 0, 1; columns 0, 1, 2
    assert torch.allclose(features[0, :, 0, 1], centred_unit(own + context))
    context = [0, 0, 0.46875, 1, 1, 0.5, 1, 1, 0.5]  # rows 0, 1, 2; columns -1, 0, 1
    assert torch.allclose(features[0, :, 1, 0], centred_unit([1.0] * 16 + context))
    # Radius 0: the token's own pixels and its mean; exposure (a gain and an offset) changes nothing.
    own_only = context_descriptor(HAND_IMAGE, stride=4, radius=0)
    assert torch.allclose(own_only[0, :, 0, 1], centred_unit(own + [0.46875]))
    assert torch.allclose(context_descriptor(0.5 * HAND_IMAGE + 0.2, stride=4, radius=1), features, atol=1e-6)


def test_the_pixel_encoder_has_the_interface_of_an_ace_model() -> None:
    """Through `encode` (the model's normalized input): the descriptor zero-padded to WIDTH channels at the
    token stride, the image pooled to 16 x 16 as the global embedding; a config whose heads fit them; no
    weights to fine-tune."""
    config = tiny_vit_config(image_size=16, patch_size=4, view_tokens=4)
    encoder = PixelEncoder(config, context_radius=1)
    dense, pooled = encode(encoder, HAND_IMAGE.repeat(3, 1, 1, 1), batch_size=2)
    assert dense.shape == (3, WIDTH, 2, 2) and pooled.shape == (3, 256)
    assert torch.allclose(
        dense[:, :25], context_descriptor(HAND_IMAGE, 4, 1).expand(3, -1, -1, -1), atol=1e-6
    )
    assert not dense[:, 25:].any()
    assert torch.allclose(pooled[0].reshape(16, 16), F.adaptive_avg_pool2d(HAND_IMAGE, 16)[0, 0], atol=1e-6)
    assert encoder.config.feature_dim == WIDTH and encoder.config.token_stride == 4
    assert encoder.config.image_size == config.image_size and encoder.config.grid_size == config.grid_size
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert torch.allclose(
        encoder(normalize_pixels(HAND_IMAGE, config)).patch_embeddings, dense[:1], atol=1e-6
    )


def test_the_pixel_encoder_runs_through_the_metric_functions() -> None:
    """Anatomical and landmark matching on token-aligned crops of one image: interior tokens have the same
    descriptor in every crop, so they match exactly; view correspondence and the few-shot heads run on it as
    on a model (linear heads only: nothing to fine-tune)."""
    generator = torch.Generator().manual_seed(0)
    config = tiny_vit_config()
    image = torch.rand(1, 1, 8 * STRIDE, 8 * STRIDE, generator=generator)
    labels_map = torch.arange(64).reshape(8, 8).repeat_interleave(STRIDE, 0).repeat_interleave(STRIDE, 1) + 1
    corners = [(0, 0), (STRIDE, 2 * STRIDE), (2 * STRIDE, STRIDE)]
    side = 6 * STRIDE
    crops = torch.cat([image[..., t : t + side, c : c + side] for t, c in corners])
    labels = patch_labels(torch.stack([labels_map[t : t + side, c : c + side] for t, c in corners]), STRIDE)
    interior = torch.full_like(labels, -1)
    interior[:, 1:-1, 1:-1] = labels[:, 1:-1, 1:-1]  # context of radius 1 inside every crop
    encoder = PixelEncoder(config, context_radius=1)
    dense, _ = encode(encoder, crops)
    assert anatomical_matching(dense, interior)["balanced_accuracy"] == 1.0
    # The centre of the image's token (3, 3): an interior token of every crop.
    landmarks = torch.full((1, 1, 2), 3.5 * STRIDE - 0.5) - torch.tensor(corners).float()[:, None]
    assert landmark_matching(dense, landmarks, STRIDE, margin=0)["median_error_px"] == 0.0
    view = view_correspondence(encoder, torch.rand(4, 1, 80, 80, generator=generator), seed=0, batch_size=4)
    assert 0.0 <= view["accuracy"] <= 1.0
    anatomy = block_maps(12, 64, 16, 4, generator)
    config = fewshot_config(segmentation_shots=[1, 3], finetune_steps=5)
    scores = segmentation_fewshot(encoder, anatomy_data(anatomy, anatomy), config)
    assert set(scores) == {"linear_k1_miou", "linear_k3_miou"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())


# ------------------------------------------------------------------------------------------------------------
# End to end on rendered held-out radiographs
# ------------------------------------------------------------------------------------------------------------

# Held-out renders are deterministic (their own seed): with 9 findings renders and test_fraction 0.55, the 5
# test renders show each finding both present and absent, and so do the 4 training renders (ROC-AUC needs
# both classes). 4 anatomy renders: 2 for testing, 2 for k = 1, 2.
E2E_SETTINGS = {
    "num_anatomy_images": 4,
    "num_findings_images": 9,
    "matching_images": 4,
    "segmentation_shots": [1, 2],
    "classification_shots": [4],
    "test_fraction": 0.55,
    "repeats": 1,
    "probe_steps": 5,
    "finetune_steps": 1,
    "finetune_batch_size": 2,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heldout")


@pytest.fixture(scope="module")
def e2e_results(cache_dir: Path) -> dict:
    torch.manual_seed(0)
    encoder = AceModel(tiny_vit_config())
    return evaluate_encoder(encoder, EvaluationConfig(**E2E_SETTINGS, cache_dir=str(cache_dir)))


def test_evaluate_encoder_reports_every_metric(e2e_results: dict) -> None:
    """The suite on 80 px renders (10 cells of 8 px): every property and few-shot score, in range."""
    properties = e2e_results["properties"]
    anatomical = properties["anatomical_matching"]
    assert 0.0 <= anatomical["balanced_accuracy"] <= 1.0 and 0.0 < anatomical["chance"] < 1.0
    assert anatomical["num_structures"] > 5 and anatomical["num_queries"] > 0
    landmarks = properties["landmark_matching"]
    assert landmarks["num_pairs"] > 0 and 0.0 <= landmarks["pck"] <= 1.0
    assert 0.0 <= landmarks["median_error_px"] <= 56 * math.sqrt(2)
    assert landmarks["position_only_median_error_px"] > 0
    view = properties["view_correspondence"]
    assert 0.0 <= view["accuracy"] <= 1.0 and view["chance"] == 1 / 16
    assert set(e2e_results["segmentation"]) == {
        f"{mode}_k{k}_miou" for mode in ("linear", "finetune") for k in (1, 2)
    }
    assert set(e2e_results["classification"]) == {"linear_k4_auc", "finetune_k4_auc"}
    for value in (*e2e_results["segmentation"].values(), *e2e_results["classification"].values()):
        assert 0.0 <= value <= 1.0
    assert e2e_results["settings"]["render_size"] == 80 and e2e_results["settings"]["crop_size"] == 56
    json.dumps(e2e_results)  # JSON-serializable


def test_results_markdown_has_a_row_per_metric(e2e_results: dict) -> None:
    """One row per headline metric and few-shot score, one column per encoder, values formatted."""
    table = results_markdown({"ace": e2e_results, "other": e2e_results})
    assert table.startswith("| metric | ace | other |\n|---|---|---|\n")
    rows = [
        "anatomical matching (bal. acc.)",
        "landmark error (median px)",
        "landmark PCK@stride",
        "view correspondence (acc.)",
        "segmentation linear k1 (mIoU)",
        "segmentation finetune k1 (mIoU)",
        "segmentation linear k2 (mIoU)",
        "segmentation finetune k2 (mIoU)",
        "classification linear k4 (AUC)",
        "classification finetune k4 (AUC)",
    ]
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert [line.split(" | ")[0][2:] for line in lines] == rows
    accuracy = e2e_results["properties"]["view_correspondence"]["accuracy"]
    assert f"| view correspondence (acc.) | {accuracy:.3f} | {accuracy:.3f} |" in table
    assert "Chance: anatomical matching" in table
    same_place = e2e_results["properties"]["anatomical_matching"]["position_only"]
    assert f"(the same place in the other image: {same_place:.3f})" in table


@pytest.fixture(scope="module")
def baseline_results(cache_dir: Path) -> dict:
    encoder = PixelEncoder(tiny_vit_config())
    return evaluate_encoder(encoder, EvaluationConfig(**E2E_SETTINGS, cache_dir=str(cache_dir)))


def test_the_pixel_baseline_runs_the_whole_suite(baseline_results: dict, e2e_results: dict) -> None:
    """The baseline goes through the suite as an encoder does: the same properties on the same crops, linear
    heads only (no weights to fine-tune)."""
    assert baseline_results["settings"] == e2e_results["settings"]
    for name, scores in baseline_results["properties"].items():
        assert set(scores) == set(e2e_results["properties"][name]), name
    anatomical = baseline_results["properties"]["anatomical_matching"]
    assert anatomical["num_queries"] == e2e_results["properties"]["anatomical_matching"]["num_queries"]
    assert set(baseline_results["segmentation"]) == {"linear_k1_miou", "linear_k2_miou"}
    assert set(baseline_results["classification"]) == {"linear_k4_auc"}
    for value in (*baseline_results["segmentation"].values(), *baseline_results["classification"].values()):
        assert 0.0 <= value <= 1.0


def test_results_markdown_shows_the_baseline_column_and_what_it_is(
    e2e_results: dict, baseline_results: dict
) -> None:
    """The baseline is a column beside the encoders'; the scores it does not have show as "-", and a note
    under the table says what it is. A results.json without it (older files, model cards) renders as before."""
    results = {"ace": e2e_results, BASELINE_COLUMN: {**baseline_results, "features": baseline_description(4)}}
    table = results_markdown(results)
    assert table.startswith("| metric | ace | pixel baseline |\n")
    matching = baseline_results["properties"]["anatomical_matching"]["balanced_accuracy"]
    assert (
        f"| {e2e_results['properties']['anatomical_matching']['balanced_accuracy']:.3f} | {matching:.3f} |"
        in table
    )
    finetuned = e2e_results["segmentation"]["finetune_k1_miou"]
    assert f"| segmentation finetune k1 (mIoU) | {finetuned:.3f} | - |" in table
    assert (
        "\npixel baseline: no model; each token described by its own pixels (4 x 4) and the mean pixels of its 9 x 9"
        in table
    )
    without = results_markdown({"ace": e2e_results})
    assert (
        without.startswith("| metric | ace |\n")
        and "pixel baseline" not in without
        and "| - |" not in without
    )


def test_results_markdown_reads_results_from_before_the_position_only_reference(e2e_results: dict) -> None:
    """A results.json written before `position_only` existed (model cards read old files) still renders."""
    old = copy.deepcopy(e2e_results)
    del old["properties"]["anatomical_matching"]["position_only"]
    table = results_markdown({"ace": old})
    assert "Chance: anatomical matching" in table and "same place" not in table


def test_evaluation_main_writes_results(e2e_results: dict, cache_dir: Path, tmp_path: Path) -> None:
    """The command line on a saved encoder plus --random_init: results.json and results.md, one column each
    (the held-out renders come from the shared cache)."""
    folder = tmp_path / "encoder"
    AceModel(tiny_vit_config()).save_pretrained(folder)
    argv = ["--model_name_or_path", str(folder), "--random_init", "--output_dir", str(tmp_path / "out")]
    argv += ["--cache_dir", str(cache_dir), "--device", "cpu"]
    for key, value in E2E_SETTINGS.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    results = main(argv)

    assert list(results) == [str(folder), "random init", BASELINE_COLUMN]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved) == [str(folder), "random init", BASELINE_COLUMN]
    assert set(saved["random init"]["classification"]) == {"linear_k4_auc", "finetune_k4_auc"}
    assert saved["random init"]["settings"]["num_findings_images"] == 9
    assert saved[BASELINE_COLUMN]["features"] == baseline_description(4)
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith(f"| metric | {folder} | random init | pixel baseline |")
    assert "| classification finetune k4 (AUC) |" in table


@pytest.mark.parametrize("pretrained_under, warns", [("2.11.0+cu130", True), (str(torch.__version__), False)])
def test_random_init_seeds_warn_when_the_run_used_another_torch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pretrained_under: str, warns: bool
) -> None:
    """torch 2.11 and 2.14 draw different trunc_normal_ weights for one seed: a run whose training summary
    records another torch minor version gets a warning that names it; the same version gets none."""
    folder = tmp_path / "encoder"
    AceModel(tiny_vit_config()).save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps({"steps": 4, "torch_version": pretrained_under}))
    args = EvaluationArguments(model_name_or_path=[str(folder)], random_init_seeds=[0])
    with caplog.at_level(logging.WARNING):
        load_encoders(args, seed=0)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert bool(warnings) == warns
    if warns:
        assert str(folder) in warnings[0] and "2.11.0+cu130" in warnings[0]


def test_random_init_seeds_build_the_weights_pretraining_starts_from(tmp_path: Path) -> None:
    """--random_init_seeds s gives exactly the student encoder of AceForPreTraining(config) built after
    torch.manual_seed(s), as a from-scratch pretraining run builds it; one column per seed, after --random_init's
    column seeded like the evaluation."""
    folder = tmp_path / "encoder"
    config = tiny_vit_config()
    AceModel(config).save_pretrained(folder)
    args, _ = parse_args(
        ["--model_name_or_path", str(folder), "--random_init", "--random_init_seeds", "3", "4"]
    )
    encoders = load_encoders(args, seed=7)
    assert list(encoders)[1:] == ["random init", "random init (seed 3)", "random init (seed 4)"]
    for name, seed in (("random init", 7), ("random init (seed 3)", 3), ("random init (seed 4)", 4)):
        torch.manual_seed(seed)
        expected = AceModel(config).state_dict()
        actual = encoders[name].state_dict()
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name
    torch.manual_seed(3)
    student = AceForPreTraining(config).student.ace.state_dict()
    reference = encoders["random init (seed 3)"].state_dict()
    assert all(torch.equal(student[key], reference[key]) for key in reference)
    assert not torch.equal(
        encoders["random init (seed 3)"].embeddings.position_embeddings,
        encoders["random init (seed 4)"].embeddings.position_embeddings,
    )


def test_arguments_come_from_one_yaml_file_and_bad_ones_stop_with_a_usage_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A .yaml file of options stands for the command line; a missing encoder or a --names of the wrong length
    stops at parsing with the reason, before any model is loaded."""
    options = tmp_path / "evaluation.yaml"
    options.write_text(
        "model_name_or_path: [org/a, org/b]\nnames: [first, second]\nsegmentation_shots: [1, 2]\n"
    )
    args, config = parse_args([str(options)])
    assert args.model_name_or_path == ["org/a", "org/b"] and args.names == ["first", "second"]
    assert config.segmentation_shots == [1, 2] and config.classification_shots == [10, 40]
    for argv, reason in (
        ([], "--model_name_or_path is required"),
        (["--model_name_or_path", "a", "b", "--names", "one"], "--names needs one name per"),
        (["--model_name_or_path", "org/a", "--names", BASELINE_COLUMN], "is the pixel baseline's column"),
        (
            ["--model_name_or_path", "org/a", "--pixel_context_radius", "8"],
            "--pixel_context_radius 8: must be 0 to 7",
        ),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert reason in capsys.readouterr().err


def test_example_script_runs_the_library_command_line() -> None:
    """examples/run_evaluation.py is the library's command line: --help lists its options and the suite's."""
    script = ROOT / "examples" / "run_evaluation.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--random_init_seeds" in result.stdout and "--segmentation_shots" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# User mistakes, earlier results, the quick preset
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def encoder_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "encoder"
    AceModel(tiny_vit_config()).save_pretrained(folder)
    return folder


def test_a_missing_local_model_is_a_usage_error_at_once(
    encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-such-run"
    argv = ["evaluate", "--model_name_or_path", str(encoder_dir), str(missing)]
    status, stderr = run_command([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert status == 2
    assert_one_error_line(stderr, f"ace-hf evaluate: error: --model_name_or_path {missing}: no such")
    assert not (tmp_path / "out").exists()


def test_a_few_shot_k_the_renders_cannot_supply_is_one_error_line_before_anything_loads(
    encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 anatomy renders keep 3 for testing: k = 20 cannot be drawn, and that is said before any model loads
    (the few-shot loop would say it after the rendering and the matching)."""
    monkeypatch.setattr("ace_hf.evaluation.run.load_encoders", lambda *args: pytest.fail("models loaded"))
    argv = ["evaluate", "--model_name_or_path", str(encoder_dir), "--output_dir", str(tmp_path / "out")]
    status, stderr = run_command(
        [*argv, "--num_anatomy_images", "8", "--segmentation_shots", "1", "20"], capsys
    )
    assert status == 1
    assert_one_error_line(stderr, "error: --segmentation_shots 20: k must be 1 to 5")


def test_earlier_results_are_kept_unless_overwrite_output_dir(
    encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second evaluation into the same --output_dir is refused before any model loads; --overwrite_output_dir
    replaces results.json and results.md (the suite itself is stubbed: this is about the folder)."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "results.json").write_text("{}")
    monkeypatch.setattr("ace_hf.evaluation.run.evaluate_encoder", lambda encoder, config: _stub_results())
    argv = ["evaluate", "--model_name_or_path", str(encoder_dir), "--output_dir", str(output_dir)]
    argv += ["--no_pixel_baseline"]
    status, stderr = run_command([*argv, "--device", "cpu"], capsys)
    assert status == 1
    assert_one_error_line(
        stderr, f"error: --output_dir {output_dir} already holds earlier results (results.json)"
    )
    assert (output_dir / "results.json").read_text() == "{}"

    assert run_command([*argv, "--device", "cpu", "--overwrite_output_dir"], capsys)[0] == 0
    assert list(json.loads((output_dir / "results.json").read_text())) == [str(encoder_dir)]
    assert (output_dir / "results.md").read_text().startswith(f"| metric | {encoder_dir} |")


def _stub_results() -> dict:
    matching = {"balanced_accuracy": 0.5, "chance": 0.1, "num_structures": 3}
    landmarks = {"median_error_px": 4.0, "pck": 0.5, "position_only_median_error_px": 9.0}
    properties = {
        "anatomical_matching": matching,
        "landmark_matching": landmarks,
        "view_correspondence": {"accuracy": 0.5, "chance": 0.06},
    }
    return {"properties": properties, "segmentation": {}, "classification": {}, "settings": {}}


def test_quick_fills_the_unset_options_and_leaves_the_set_ones() -> None:
    full, quick = EvaluationConfig(), EvaluationConfig(quick=True)
    assert {name: getattr(full, name) for name in FULL_SUITE} == FULL_SUITE
    assert {name: getattr(quick, name) for name in QUICK_SUITE} == QUICK_SUITE
    assert quick.matching_images == QUICK_SUITE["num_anatomy_images"]
    assert EvaluationConfig(quick=True, repeats=3, segmentation_shots=[2]).repeats == 3
    _, from_command_line = parse_args(["--model_name_or_path", "org/a", "--quick", "--finetune_steps", "5"])
    assert from_command_line.finetune_steps == 5 and from_command_line.num_findings_images == 48
    full.segmentation_shots.append(99)  # each config owns its lists
    assert EvaluationConfig().segmentation_shots == [1, 5, 20]


def random_heldout(
    num_images: int, render_size: int, with_findings: bool, cache_dir: str | None
) -> HeldOutData:
    """Held-out data of the right shapes without the renderer: noise images, block label maps, alternating
    findings (every draw and the test set see both classes)."""
    generator = torch.Generator().manual_seed(num_images)
    findings = (torch.arange(num_images)[:, None] + torch.arange(3)) % 2
    return HeldOutData(
        images=torch.rand(num_images, 1, render_size, render_size, generator=generator),
        structures=block_maps(num_images, render_size, STRIDE, 6, generator),
        anatomy=block_maps(num_images, render_size, STRIDE, 4, generator),
        landmarks=torch.rand(num_images, 5, 2, generator=generator) * render_size,
        findings=findings.float() if with_findings else None,
        info={
            "anatomy_labels": ["background", "a", "b", "c"],
            "findings": ["x", "y", "z"] if with_findings else [],
        },
    )


def test_the_quick_preset_runs_with_a_progress_bar_per_task(
    encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog, monkeypatch
) -> None:
    """`--quick` end to end on the tiny encoder (random held-out data of the quick sizes stand in for the
    renders, which the tests above cover): every task shows its bar and logs its time, no fine-tuning rows."""
    monkeypatch.setattr("ace_hf.evaluation.suite.load_heldout", random_heldout)
    argv = ["--model_name_or_path", str(encoder_dir), "--output_dir", str(tmp_path / "out"), "--quick"]
    with caplog.at_level(logging.INFO):
        results = main([*argv, "--device", "cpu"])
    result = results[str(encoder_dir)]
    assert set(result["segmentation"]) == {"linear_k1_miou", "linear_k5_miou"}
    assert set(result["classification"]) == {"linear_k10_auc"}
    assert result["settings"]["quick"] and result["settings"]["num_anatomy_images"] == 24
    stderr = capsys.readouterr().err
    tasks = ["anatomical matching", "landmark matching", "view correspondence", "few-shot segmentation"]
    for index, task in enumerate([*tasks, "few-shot findings"], 1):
        assert f"[{index}/5] {task}" in stderr, task
        assert f"[{index}/5] {task}: " in caplog.text, task
    assert "k=5, draw 1: linear head" in stderr
