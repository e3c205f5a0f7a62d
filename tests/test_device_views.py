"""Views cut in two halves (CPU parameters + sources, batched `cut_views` on a device) against the per-image
torchvision path they replace: equivalence, per-op agreement, pixel-exact geometry, determinism, dtypes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from ace_hf import AceImageProcessor, correspondence_targets
from ace_hf.correspondence_ace import sample_view_origins
from ace_hf.image_processing_ace import (
    batched_adjust_brightness,
    batched_adjust_contrast,
    batched_adjust_sharpness,
    batched_gaussian_blur,
    equalize_local_contrast,
    random_resized_crop_box,
    resize_unit,
)
from ace_hf.pretraining.data import ImageBatchCollator, ViewPairCollator, cut_batch_views

N, CELL, GRID = 4, 4, 10  # view_tokens, cell_size, grid_size of the tiny processor
SIDE = GRID * CELL  # the jittered image is SIDE x SIDE pixels
ALWAYS = {"brightness_contrast_prob": 1.0, "blur_prob": 1.0, "sharpen_prob": 1.0, "local_contrast_prob": 1.0}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(**overrides) -> AceImageProcessor:
    settings = {"size": N * CELL, "cell_size": CELL, "view_tokens": N, "grid_size": GRID}
    return AceImageProcessor(**{**settings, **overrides})


def reference_views(
    processor: AceImageProcessor, images: list, do_augment: bool, do_jitter: bool, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The per-image CPU path that `sample_views` was before `cut_views`: torchvision ops, view by view."""
    n, cell, side = processor.view_tokens, processor.cell_size, processor.grid_size * processor.cell_size
    origins = sample_view_origins(
        len(images), processor.grid_size, n, processor.min_overlap, generator=generator
    )
    large, small = [], []
    for image, (row1, col1, row2, col2) in zip(images, origins.tolist(), strict=True):
        pixels = processor.to_unit_float(image)
        if do_jitter:
            box = random_resized_crop_box(
                *pixels.shape[-2:], processor.jitter_scale, processor.jitter_ratio, generator
            )
            pixels = tvF.resized_crop(
                pixels, *box, [side, side], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
            ).clamp(0, 1)
        else:
            pixels = resize_unit(pixels, side, side)
        large.append(pixels[:, row1 * cell : (row1 + 2 * n) * cell, col1 * cell : (col1 + 2 * n) * cell])
        small.append(pixels[:, row2 * cell : (row2 + n) * cell, col2 * cell : (col2 + n) * cell])
    views = {
        "pixel_values_large": F.avg_pool2d(torch.stack(large), 2),
        "pixel_values_small": torch.stack(small),
    }
    for key, pixels in views.items():
        views[key] = processor._normalize(
            reference_augment(processor, pixels, generator) if do_augment else pixels
        )
    return {**views, "view_origins": origins}


def reference_augment(
    processor: AceImageProcessor, views: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The per-view torchvision augmentation that `_augment` was before it was batched."""
    p = processor
    probs = torch.tensor([p.local_contrast_prob, p.brightness_contrast_prob, p.blur_prob, p.sharpen_prob])
    apply = torch.rand(views.shape[0], 4, generator=generator) < probs
    strength = torch.rand(views.shape[0], 4, generator=generator)
    views = views.clone()
    if apply[:, 0].any():
        views[apply[:, 0]] = equalize_local_contrast(
            views[apply[:, 0]], p.local_contrast_tiles, p.local_contrast_clip
        )
    max_radius = min(views.shape[-2:]) - 1
    for i in range(views.shape[0]):
        brightness, contrast, sigma, sharpness = strength[i].tolist()
        if apply[i, 1]:
            views[i] = tvF.adjust_brightness(views[i], 1 + p.brightness * (2 * brightness - 1))
            views[i] = tvF.adjust_contrast(views[i], 1 + p.contrast * (2 * contrast - 1))
        if apply[i, 2]:
            sigma = p.blur_sigma[0] + sigma * (p.blur_sigma[1] - p.blur_sigma[0])
            kernel = 2 * min(math.ceil(3 * sigma), max_radius) + 1
            views[i] = tvF.gaussian_blur(views[i], [kernel, kernel], [sigma, sigma])
        if apply[i, 3]:
            views[i] = tvF.adjust_sharpness(
                views[i], p.sharpness[0] + sharpness * (p.sharpness[1] - p.sharpness[0])
            )
    return views


def two_halves(
    processor: AceImageProcessor,
    images: list,
    do_augment: bool,
    do_jitter: bool,
    generator: torch.Generator,
    downsample: bool = True,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """The training pipeline: CPU half (window, draw, sources) then `cut_views` on `device`."""
    pixels = [processor.to_unit_float(image, keep_gray=True) for image in images]
    parameters = processor.draw_view_parameters(
        [p.shape[-2:] for p in pixels], do_augment, do_jitter, generator
    )
    sources, parameters["crop_boxes"] = processor.view_sources(pixels, parameters["crop_boxes"], downsample)
    batch = {"images": sources, "view_parameters": parameters, "sample_ids": None, "skipped": []}
    return cut_batch_views(processor, batch, device)


def radiographs() -> list:
    """Sizes around the grid side SIDE: larger on both axes, on one axis, smaller; gray 8/16 bit and RGB."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 4096, (97, 83)).astype(np.uint16),
        rng.integers(0, 255, (52, 31), dtype=np.uint8),
        rng.random((33, 45)),
        torch.rand(3, 61, 44),
        rng.integers(0, 255, (SIDE, SIDE), dtype=np.uint8),
    ]


def assert_views_close(actual: dict, expected: dict, atol: float) -> None:
    assert torch.equal(actual["view_origins"], expected["view_origins"])
    for key in ("pixel_values_large", "pixel_values_small"):
        assert actual[key].shape == expected[key].shape and actual[key].dtype == torch.float32, key
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


# ----------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("downsample", [True, False])
@pytest.mark.parametrize("do_jitter", [False, True])
def test_device_views_equal_the_per_image_path(num_channels: int, downsample: bool, do_jitter: bool) -> None:
    """Without augmentation, with or without jitter, and whether the sources are shrunk on the CPU or not: the
    same seed gives the same views as the torchvision per-image path (same draws, same resize kernel)."""
    processor = tiny(num_channels=num_channels)
    images = radiographs()
    expected = reference_views(processor, images, False, do_jitter, torch.Generator().manual_seed(3))
    actual = two_halves(processor, images, False, do_jitter, torch.Generator().manual_seed(3), downsample)
    assert_views_close(actual, expected, atol=1e-6)
    assert_views_close(
        processor.sample_views(images, False, do_jitter, torch.Generator().manual_seed(3)),
        expected,
        atol=1e-6,
    )


def test_without_downsampling_the_views_are_bit_identical_to_torchvision() -> None:
    """The device resizes each crop with the kernel tvF.resized_crop calls: the same parameters give the same
    bits, not just close values."""
    processor = tiny(num_channels=1, image_mean=0.0, image_std=1.0)
    images = radiographs()
    expected = reference_views(processor, images, False, True, torch.Generator().manual_seed(8))
    actual = two_halves(processor, images, False, True, torch.Generator().manual_seed(8), downsample=False)
    assert_views_close(actual, expected, atol=0)


def test_downsampled_sources_are_at_most_the_grid_side() -> None:
    """`view_sources(downsample=True)` sends each jitter crop with no side over S, its box the whole crop (the
    views stay the same: test_device_views_equal_the_per_image_path runs both ways)."""
    processor = tiny()
    pixels = [processor.to_unit_float(image, keep_gray=True) for image in radiographs()]
    parameters = processor.draw_view_parameters([p.shape[-2:] for p in pixels], generator=torch.Generator())
    sources, boxes = processor.view_sources(pixels, parameters["crop_boxes"], downsample=True)
    full, _ = processor.view_sources(pixels, parameters["crop_boxes"], downsample=False)
    assert max(sources.shape[-2:]) <= SIDE < max(full.shape[-2:])
    for (top, left, height, width), drawn in zip(boxes, parameters["crop_boxes"], strict=True):
        assert (top, left) == (0, 0) and (height, width) == (min(drawn[2], SIDE), min(drawn[3], SIDE))
    assert sources.shape[1] == 3 and full.shape[1] == 3  # one RGB image: the gray ones are replicated


@pytest.mark.parametrize("num_channels", [1, 3])
def test_augmented_device_views_match_the_per_image_path(num_channels: int) -> None:
    """With every augmentation on (and with the default probabilities), the batched ops reproduce the per-view
    torchvision ones: the same seed gives the same views to float rounding."""
    images = radiographs()
    for settings in (ALWAYS, {}):
        processor = tiny(num_channels=num_channels, **settings)
        for seed in range(3):
            expected = reference_views(processor, images, True, True, torch.Generator().manual_seed(seed))
            actual = two_halves(processor, images, True, True, torch.Generator().manual_seed(seed))
            assert_views_close(actual, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------- batched ops


def views_batch(channels: int, seed: int = 0) -> torch.Tensor:
    """Smooth views with structure and grain in [0, 1], the kind the ops see."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(6, channels, 5, 5, generator=generator)
    smooth = F.interpolate(coarse, size=(24, 20), mode="bicubic", align_corners=False)
    return (smooth + 0.1 * torch.rand(6, channels, 24, 20, generator=generator)).clamp(0, 1)


def view_by_view(op, views: torch.Tensor, *factors: list[float]) -> torch.Tensor:
    return torch.stack([op(view, *values) for view, *values in zip(views, *factors, strict=True)])


def test_batched_brightness_and_contrast_match_torchvision() -> None:
    factors = torch.tensor([0.6, 0.85, 1.0, 1.2, 1.4, 0.73])
    for channels in (1, 3):
        views = views_batch(channels)
        torch.testing.assert_close(
            batched_adjust_brightness(views, factors),
            view_by_view(tvF.adjust_brightness, views, factors.tolist()),
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            batched_adjust_contrast(views, factors, rgb=channels == 3),
            view_by_view(tvF.adjust_contrast, views, factors.tolist()),
            rtol=0,
            atol=1e-5,
        )
    # A one-channel view standing for a gray RGB image has the gray level of its three replicated channels.
    gray = views_batch(1)
    torch.testing.assert_close(
        batched_adjust_contrast(gray, factors, rgb=True).expand(-1, 3, -1, -1),
        view_by_view(tvF.adjust_contrast, gray.expand(-1, 3, -1, -1), factors.tolist()),
        rtol=0,
        atol=1e-5,
    )


def test_batched_gaussian_blur_matches_torchvision() -> None:
    """Per-view sigmas and kernel sizes, padded to the largest kernel, reflect borders; radius 0 = unchanged."""
    sigmas = torch.tensor([0.1, 0.5, 0.93, 1.4, 2.0, 1.1])
    radii = torch.tensor([1, 2, 3, 5, 6, 0])
    for channels in (1, 3):
        views = views_batch(channels, seed=1)
        blurred = batched_gaussian_blur(views, sigmas, radii, max_radius=7)
        for view, out, sigma, radius in zip(views, blurred, sigmas.tolist(), radii.tolist(), strict=True):
            expected = tvF.gaussian_blur(view, [2 * radius + 1] * 2, [sigma, sigma]) if radius else view
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_batched_sharpness_matches_torchvision() -> None:
    factors = torch.tensor([1.5, 2.0, 3.0, 1.0, 0.5, 2.7])
    for channels in (1, 3):
        views = views_batch(channels, seed=2)
        torch.testing.assert_close(
            batched_adjust_sharpness(views, factors),
            view_by_view(tvF.adjust_sharpness, views, factors.tolist()),
            rtol=0,
            atol=1e-5,
        )
    tiny_views = torch.rand(2, 1, 2, 5)
    assert torch.equal(batched_adjust_sharpness(tiny_views, torch.tensor([2.0, 3.0])), tiny_views)


# ----------------------------------------------------------------------------------------- geometry


def cell_id_image() -> torch.Tensor:
    """A SIDE x SIDE image whose every cell is constant at its own id / GRID^2 (row-major ids)."""
    ids = torch.arange(GRID * GRID, dtype=torch.float32).reshape(GRID, GRID) / GRID**2
    return ids.repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)


def token_cells(view: torch.Tensor, tokens_per_side: int, token: int, cells_per_token: int) -> torch.Tensor:
    """Cell ids under every token of a [H, W] view: [tokens, tokens, cells_per_token, cells_per_token]."""
    pixels_per_cell = token // cells_per_token
    blocks = view.reshape(
        tokens_per_side, cells_per_token, pixels_per_cell, tokens_per_side, cells_per_token, pixels_per_cell
    )
    # -> token row, token col, cell row, cell col, pixel row, pixel col
    blocks = blocks.permute(0, 3, 1, 4, 2, 5)
    assert (blocks == blocks[..., :1, :1]).all(), "a cell's pixels are not constant: cells were mixed"
    return (blocks[..., 0, 0] * GRID**2).round().long()


def test_every_token_of_both_views_sees_its_expected_cells() -> None:
    """Through the training collator, with a jitter box that is the whole image and augmentation drawn but never
    applied (every op then leaves the views exactly as they are): small-view token (r, c) is cell
    (R2 + r, C2 + c); large-view token (r, c) covers cells (R1 + 2r .. + 1, C1 + 2c .. + 1); matched tokens of
    the correspondence targets share cells."""
    processor = tiny(
        num_channels=1,
        image_mean=0.0,
        image_std=1.0,
        min_overlap=0.25,
        jitter_scale=(1, 1),
        jitter_ratio=(1, 1),
        **dict.fromkeys(ALWAYS, 0.0),
    )
    batch = ImageBatchCollator(processor)([{"index": i, "image": cell_id_image()} for i in range(32)])
    views = cut_batch_views(processor, batch, "cpu")
    origins = views["view_origins"]
    assert ((origins[:, 2] - origins[:, 0]) != (origins[:, 3] - origins[:, 1])).any()
    ids = torch.arange(GRID * GRID).reshape(GRID, GRID)
    targets = correspondence_targets(origins, N)
    for b, (r1, c1, r2, c2) in enumerate(origins.tolist()):
        small = token_cells(views["pixel_values_small"][b, 0], N, CELL, 1)[..., 0, 0]
        large = token_cells(views["pixel_values_large"][b, 0], N, CELL, 2)
        assert torch.equal(small, ids[r2 : r2 + N, c2 : c2 + N])
        expected_large = ids[r1 : r1 + 2 * N, c1 : c1 + 2 * N].reshape(N, 2, N, 2).permute(0, 2, 1, 3)
        assert torch.equal(large, expected_large)
        # Decomposition: small token i -> its large sub-token j; composition: large token k -> a 2 x 2 small block.
        for i in targets.overlap_small[b].nonzero().flatten().tolist():
            j = int(targets.decomposition[b, i].argmax())
            (r, c), (jr, jc) = divmod(i, N), divmod(j, 2 * N)
            assert small[r, c] == large[jr // 2, jc // 2, jr % 2, jc % 2]
        for k in targets.overlap_large[b].nonzero().flatten().tolist():
            p = int(targets.composition[b, k].argmax())
            (kr, kc), (pr, pc) = divmod(k, N), divmod(p, N // 2)
            assert torch.equal(large[kr, kc], small[2 * pr : 2 * pr + 2, 2 * pc : 2 * pc + 2])


# ----------------------------------------------------------------------------------------- determinism


def png_example(index: int, array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"index": index, "image": {"bytes": buffer.getvalue(), "path": f"img{index}.png"}}


def examples() -> list[dict]:
    """Eight examples of different sizes (so the padded batch changes with its composition), 8 and 16 bit."""
    rng = np.random.default_rng(1)
    sizes = [(60, 47), (23, 31), (44, 44), (90, 35), (40, 40), (31, 77), (52, 52), (28, 65)]
    return [
        png_example(i, rng.integers(0, 4096 if i % 2 else 255, size).astype(np.uint16 if i % 2 else np.uint8))
        for i, size in enumerate(sizes)
    ]


def views_by_example(
    processor: AceImageProcessor, batches: list[list[dict]], device: str
) -> dict[int, tuple]:
    collator = ImageBatchCollator(processor, seed=5, epoch=2)
    views = {}
    for examples_ in batches:
        batch = cut_batch_views(processor, collator(examples_), device)
        for row, example in enumerate(examples_):
            views[example["index"]] = tuple(
                batch[key][row].cpu() for key in ("pixel_values_large", "pixel_values_small", "view_origins")
            )
    return views


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_views_depend_only_on_the_example_not_the_batch(device: str) -> None:
    """Per-example seeds give bit-identical views whatever batch an example lands in (its size, order, padding):
    so views do not depend on the worker or process count."""
    processor = tiny(**{key: 0.5 for key in ALWAYS})
    data = examples()
    one_batch = views_by_example(processor, [data], device)
    for batches in (
        [data[::-1]],
        [data[:3], data[3:]],
        [[example] for example in data],
        [data[5:], data[:5]],
    ):
        other = views_by_example(processor, batches, device)
        for index, expected in one_batch.items():
            for actual, wanted in zip(other[index], expected, strict=True):
                assert torch.equal(actual, wanted), index


@CUDA
def test_cuda_views_match_cpu_views() -> None:
    processor = tiny(**ALWAYS)
    on_cpu = views_by_example(processor, [examples()], "cpu")
    on_cuda = views_by_example(processor, [examples()], "cuda")
    for index, expected in on_cpu.items():
        for actual, wanted in zip(on_cuda[index], expected, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-5)


def test_view_pair_collator_is_the_image_batch_collator_plus_cut_views() -> None:
    processor = tiny(**ALWAYS)
    data = examples()
    on_cpu = ViewPairCollator(processor, seed=5, epoch=2)(data)
    expected = cut_batch_views(processor, ImageBatchCollator(processor, seed=5, epoch=2)(data), "cpu")
    for key in ("pixel_values_large", "pixel_values_small", "view_origins", "sample_ids"):
        assert torch.equal(on_cpu[key], expected[key]), key


def test_persistent_workers_see_the_new_epoch() -> None:
    """The epoch lives in shared memory: a persistent worker, started in epoch 0, cuts epoch 1's views."""
    processor = tiny()
    data = examples()[:4]
    collator = ImageBatchCollator(processor, seed=5)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, collate_fn=collator, num_workers=1, persistent_workers=True
    )
    first = next(iter(loader))
    collator.epoch = 1
    second = next(iter(loader))
    expected = ImageBatchCollator(processor, seed=5, epoch=1)(data)
    assert not torch.equal(
        first["view_parameters"]["view_origins"], second["view_parameters"]["view_origins"]
    )
    assert torch.equal(second["view_parameters"]["view_origins"], expected["view_parameters"]["view_origins"])
    assert torch.equal(second["images"], expected["images"])


# ----------------------------------------------------------------------------------------- dtypes


def test_cut_views_is_float32_and_finite_under_bf16_autocast() -> None:
    """cut_views turns autocast off: under bf16 autocast its views are the float32 ones, bit for bit; half-
    precision sources are computed in float32 too."""
    processor = tiny(**ALWAYS)
    batch = ImageBatchCollator(processor, seed=1)(examples())
    reference = cut_batch_views(processor, batch, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cut_batch_views(processor, batch, "cpu")
    half = cut_batch_views(processor, {**batch, "images": batch["images"].bfloat16()}, "cpu")
    for key in ("pixel_values_large", "pixel_values_small"):
        assert autocast[key].dtype == half[key].dtype == torch.float32
        assert torch.equal(autocast[key], reference[key]), key
        assert torch.isfinite(half[key]).all()
        torch.testing.assert_close(half[key], reference[key], rtol=0, atol=0.05)
