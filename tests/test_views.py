"""AceImageProcessor.sample_views: shapes, seeding, origins, pixel-exact geometry, augmentation helpers."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from ace_hf import AceImageProcessor, correspondence_targets
from ace_hf.image_processing_ace import equalize_local_contrast, random_resized_crop_box

N, CELL, GRID = 4, 4, 10  # view_tokens, cell_size, grid_size of the tiny processor
SIDE = GRID * CELL  # the jittered image is SIDE x SIDE pixels


def tiny(**overrides) -> AceImageProcessor:
    settings = {"size": N * CELL, "cell_size": CELL, "view_tokens": N, "grid_size": GRID}
    return AceImageProcessor(**{**settings, **overrides})


def mixed_images() -> list:
    return [
        np.random.rand(50, 37),
        torch.rand(3, 30, 60),
        PIL.Image.new("I;16", (45, 45), 3000),
        np.ones((41, 41, 3)),
    ]


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize(("do_augment", "do_jitter"), [(True, True), (False, True), (True, False)])
def test_shapes_and_dtypes(num_channels: int, do_augment: bool, do_jitter: bool) -> None:
    views = tiny(num_channels=num_channels).sample_views(
        mixed_images(), do_augment=do_augment, do_jitter=do_jitter
    )
    for key in ("pixel_values_large", "pixel_values_small"):
        assert views[key].shape == (4, num_channels, N * CELL, N * CELL) and views[key].dtype == torch.float32
        assert torch.isfinite(views[key]).all()
        assert views[key].min() >= -0.5056 / 0.252 - 1e-5 and views[key].max() <= (1 - 0.5056) / 0.252 + 1e-5
    assert views["view_origins"].shape == (4, 4) and views["view_origins"].dtype == torch.long


def test_seeded_generator_is_deterministic() -> None:
    processor = tiny(local_contrast_prob=0.5, sharpen_prob=0.5)
    images = [torch.rand(33, 47) for _ in range(6)]

    def views(seed: int):
        return processor.sample_views(images, generator=torch.Generator().manual_seed(seed))

    first, again, other = views(3), views(3), views(4)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["pixel_values_large"], other["pixel_values_large"])
    assert not torch.equal(first["pixel_values_small"], other["pixel_values_small"])


def test_origins_respect_bounds_parity_and_overlap() -> None:
    min_overlap = 0.5
    views = tiny(min_overlap=min_overlap).sample_views(
        [np.zeros((4, 4))] * 200,
        do_augment=False,
        do_jitter=False,
        generator=torch.Generator().manual_seed(0),
    )
    r1, c1, r2, c2 = views["view_origins"].T
    assert ((r1 >= 0) & (c1 >= 0) & (r1 + 2 * N <= GRID) & (c1 + 2 * N <= GRID)).all()
    assert ((r2 >= 0) & (c2 >= 0) & (r2 + N <= GRID) & (c2 + N <= GRID)).all()
    assert ((r2 - r1) % 2 == 0).all() and ((c2 - c1) % 2 == 0).all()
    rows = (torch.minimum(r1 + 2 * N, r2 + N) - torch.maximum(r1, r2)).clamp(min=0)
    cols = (torch.minimum(c1 + 2 * N, c2 + N) - torch.maximum(c1, c2)).clamp(min=0)
    assert (rows * cols >= min_overlap * N * N).all()
    assert len({tuple(o) for o in views["view_origins"].tolist()}) > 20  # really random


def cell(image: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Pixels of grid cell (row, col) of an [H, W] image with CELL-pixel cells."""
    return image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]


def pool(pixels: torch.Tensor) -> torch.Tensor:
    """2 x 2 average pooling of an [H, W] block."""
    return F.avg_pool2d(pixels[None, None], 2)[0, 0]


def test_views_and_correspondence_targets_are_pixel_exact() -> None:
    """The pixels under every matched token pair are the same image pixels (rows and columns not swapped)."""
    image = torch.randperm(SIDE * SIDE).reshape(SIDE, SIDE).float() / (
        SIDE * SIDE
    )  # every pixel unique, in [0, 1)
    processor = tiny(num_channels=1, image_mean=0.0, image_std=1.0, min_overlap=0.25)
    views = processor.sample_views(
        [image] * 64, do_augment=False, do_jitter=False, generator=torch.Generator().manual_seed(1)
    )
    origins = views["view_origins"]
    assert (
        (origins[:, 2] - origins[:, 0]) != (origins[:, 3] - origins[:, 1])
    ).any()  # row offset != col offset
    targets = correspondence_targets(origins, N)
    pooled_image = pool(image)
    half = CELL // 2  # pixels of one cell (= one sub-token) in the half-resolution large view
    for b, (r1, c1, r2, c2) in enumerate(origins.tolist()):
        large, small = views["pixel_values_large"][b, 0], views["pixel_values_small"][b, 0]
        assert torch.equal(small, image[r2 * CELL : (r2 + N) * CELL, c2 * CELL : (c2 + N) * CELL])
        torch.testing.assert_close(
            large,
            pooled_image[r1 * half : (r1 + 2 * N) * half, c1 * half : (c1 + 2 * N) * half],
            rtol=0,
            atol=1e-7,
        )
        # The masks hold every token whose cells lie in both views: rows x cols cells, (rows / 2) x (cols / 2) large tokens.
        rows, cols = min(r1 + 2 * N, r2 + N) - max(r1, r2), min(c1 + 2 * N, c2 + N) - max(c1, c2)
        assert (
            targets.overlap_small[b].sum() == rows * cols
            and targets.overlap_large[b].sum() == rows * cols // 4
        )
        # Decomposition: small token i is image cell (r2 + r, c2 + c); its peak sub-token j must cover that cell.
        assert not targets.decomposition[b][~targets.overlap_small[b]].any()
        for i in targets.overlap_small[b].nonzero().flatten().tolist():
            row = targets.decomposition[b, i]
            j = int(row.argmax())
            assert row[j] == 1
            (r, c), (jr, jc) = divmod(i, N), divmod(j, 2 * N)
            small_token = small[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            assert torch.equal(small_token, cell(image, r2 + r, c2 + c))
            sub_token = large[jr * half : (jr + 1) * half, jc * half : (jc + 1) * half]
            torch.testing.assert_close(sub_token, pool(small_token), rtol=0, atol=1e-7)
        # Composition: large token k and the 2 x 2 small-token block at its peak position cover the same cells.
        assert not targets.composition[b][~targets.overlap_large[b]].any()
        for k in targets.overlap_large[b].nonzero().flatten().tolist():
            row = targets.composition[b, k]
            p = int(row.argmax())
            assert row[p] == 1
            (kr, kc), (pr, pc) = divmod(k, N), divmod(p, N // 2)
            block = small[2 * pr * CELL : (2 * pr + 2) * CELL, 2 * pc * CELL : (2 * pc + 2) * CELL]
            large_token = large[kr * CELL : (kr + 1) * CELL, kc * CELL : (kc + 1) * CELL]
            torch.testing.assert_close(large_token, pool(block), rtol=0, atol=1e-7)


def test_augmentation_changes_views_but_keeps_range() -> None:
    image = torch.rand(SIDE, SIDE)
    settings = {"image_mean": 0.0, "image_std": 1.0, "num_channels": 1}
    always = {
        "brightness_contrast_prob": 1.0,
        "blur_prob": 1.0,
        "sharpen_prob": 1.0,
        "local_contrast_prob": 1.0,
    }
    never = dict.fromkeys(always, 0.0)

    def views(probabilities: dict, do_augment: bool = True):
        processor = tiny(**settings, **probabilities)
        return processor.sample_views(
            [image] * 3, do_augment, do_jitter=False, generator=torch.Generator().manual_seed(5)
        )

    reference, unchanged, changed = views(never, do_augment=False), views(never), views(always)
    assert torch.equal(changed["view_origins"], reference["view_origins"])
    for key in ("pixel_values_large", "pixel_values_small"):
        assert torch.equal(unchanged[key], reference[key])
        assert changed[key].min() >= 0 and changed[key].max() <= 1
        assert not torch.allclose(changed[key], reference[key])


def test_local_contrast_equalization() -> None:
    flat = 0.4 + 0.2 * torch.rand(2, 3, 24, 20)  # low contrast
    equalized = equalize_local_contrast(flat, tiles=4, clip_limit=4.0)
    assert equalized.shape == flat.shape and equalized.min() >= 0 and equalized.max() <= 1
    assert equalized.std() > 2 * flat.std()
    # The clip limit bounds the contrast gain: a lower limit boosts less.
    assert flat.std() < equalize_local_contrast(flat, tiles=4, clip_limit=1.0).std() < equalized.std()
    constant = torch.full((1, 1, 9, 9), 0.3)
    assert equalize_local_contrast(constant, tiles=2).unique().numel() == 1  # no tile seams


def test_random_resized_crop_box() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, height, width = random_resized_crop_box(60, 80, (0.5, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + height <= 60 and 0 <= left and left + width <= 80
        assert 0.45 <= height * width / (60 * 80) <= 1.0
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05
    first = random_resized_crop_box(60, 80, (0.5, 1.0), (0.75, 1.33), torch.Generator().manual_seed(9))
    assert first == random_resized_crop_box(
        60, 80, (0.5, 1.0), (0.75, 1.33), torch.Generator().manual_seed(9)
    )
    # Impossible ratio: falls back to the largest centered crop of the nearest allowed ratio.
    assert random_resized_crop_box(10, 100, (0.99, 1.0), (1.0, 1.0), generator) == (0, 45, 10, 10)


def test_jitter_with_full_box_matches_plain_resize() -> None:
    image = torch.rand(SIDE, SIDE)
    processor = tiny(
        num_channels=1, image_mean=0.0, image_std=1.0, jitter_scale=(1.0, 1.0), jitter_ratio=(1.0, 1.0)
    )
    jittered = processor.sample_views([image], do_augment=False, generator=torch.Generator().manual_seed(2))
    plain = processor.sample_views(
        [image], do_augment=False, do_jitter=False, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(jittered["pixel_values_small"], plain["pixel_values_small"])
