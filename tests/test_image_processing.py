"""AceImageProcessor inference path: input kinds, windowing, channels, inference size and resize modes, saved
settings (old flat exports included), errors, remote-code imports."""

from __future__ import annotations

import ast
import json
import logging
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, pipeline
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from ace_hf import AceConfig, AceImageProcessor, AceModel
from ace_hf.image_processing_ace import (
    LUMA_WEIGHTS,
    PAD_VALUE,
    PRETRAINING_SETTING_NAMES,
    PretrainingSettings,
    view_geometry,
)

SIDE = 16  # model input side of the tiny processor: view_tokens 4 x cell_size 4
TINY = {"size": SIDE, "cell_size": 4, "view_tokens": 4, "grid_size": 10}


def tiny(**overrides) -> AceImageProcessor:
    return AceImageProcessor(**{**TINY, **overrides})


def gradient(height: int = 12, width: int = 20) -> np.ndarray:
    """Float image in [0, 1] that is different in every pixel (and not symmetric)."""
    return np.arange(height * width, dtype=np.float64).reshape(height, width) / (height * width - 1)


def save(image: PIL.Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# Each entry builds one accepted input (tmp_path for the file kinds).
INPUTS = {
    "png-L-str": lambda d: str(save(PIL.Image.fromarray((gradient() * 255).astype(np.uint8)), d / "l.png")),
    "png-16bit-path": lambda d: save(
        PIL.Image.fromarray((gradient() * 4095).astype(np.uint16)), d / "i16.png"
    ),
    "jpeg-rgb": lambda d: save(
        PIL.Image.fromarray((np.random.rand(12, 20, 3) * 255).astype(np.uint8)), d / "c.jpg"
    ),
    "tiff-float": lambda d: save(PIL.Image.fromarray(gradient().astype(np.float32) * 7), d / "f.tif"),
    "pil-L": lambda d: PIL.Image.fromarray((gradient() * 255).astype(np.uint8)),
    "pil-I;16": lambda d: PIL.Image.fromarray((gradient() * 4095).astype(np.uint16)),
    "pil-I": lambda d: PIL.Image.fromarray((gradient() * 1e5).astype(np.int32)),
    "pil-F": lambda d: PIL.Image.fromarray(gradient().astype(np.float32)),
    "pil-RGB": lambda d: PIL.Image.new("RGB", (20, 12), (10, 200, 30)),
    "pil-RGBA": lambda d: PIL.Image.new("RGBA", (20, 12), (10, 200, 30, 100)),
    "pil-P": lambda d: PIL.Image.new("RGB", (20, 12), (10, 200, 30)).convert("P"),
    "pil-LA": lambda d: PIL.Image.new("LA", (20, 12), (90, 5)),
    "pil-1": lambda d: PIL.Image.fromarray(gradient() > 0.5),
    "np-uint8": lambda d: (gradient() * 255).astype(np.uint8),
    "np-uint16": lambda d: (gradient() * 4095).astype(np.uint16),
    "np-int16": lambda d: (gradient() * 2000 - 1000).astype(np.int16),
    "np-int32": lambda d: (gradient() * 1e6).astype(np.int32),
    "np-float32": lambda d: gradient().astype(np.float32),
    "np-float64-hu": lambda d: gradient() * 3000 - 1000,
    "np-bool": lambda d: gradient() > 0.3,
    "np-hw1": lambda d: gradient()[..., None],
    "np-hw3": lambda d: np.random.rand(12, 20, 3),
    "np-hw4": lambda d: np.random.rand(12, 20, 4),
    "torch-hw": lambda d: torch.from_numpy(gradient()).float(),
    "torch-1hw": lambda d: torch.from_numpy(gradient())[None],
    "torch-3hw-uint8": lambda d: torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8),
    "torch-4hw": lambda d: torch.rand(4, 12, 20),
    "torch-half": lambda d: torch.rand(12, 20).half(),
    "torch-uint16": lambda d: torch.from_numpy((gradient() * 4095).astype(np.uint16)),
}


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_every_input_kind_gives_model_input(kind: str, num_channels: int, tmp_path: Path) -> None:
    processor = tiny(num_channels=num_channels)
    image = INPUTS[kind](tmp_path)
    unit = processor.to_unit_float(image)
    assert unit.dtype == torch.float32 and unit.shape == (num_channels, 12, 20)
    assert unit.min() >= 0 and unit.max() <= 1
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (1, num_channels, SIDE, SIDE)
    assert torch.isfinite(pixel_values).all()


def test_list_of_mixed_kinds_and_sizes() -> None:
    images = [np.random.rand(30, 17), torch.rand(3, 8, 9), PIL.Image.new("L", (40, 50), 7)]
    out = tiny().preprocess(images, return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, SIDE, SIDE)
    assert isinstance(tiny()(images, return_tensors="np")["pixel_values"], np.ndarray)


def test_16bit_png_keeps_its_full_range(tmp_path: Path) -> None:
    values = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * 4095 // (SIDE * SIDE - 1)).astype(np.uint16)
    path = tmp_path / "xray12bit.png"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as reopened:
        assert reopened.mode == "I;16"
        from_pil = tiny(num_channels=1).to_unit_float(reopened)
    unit = tiny(num_channels=1).to_unit_float(path)
    expected = torch.from_numpy(values / 4095).float()[None]
    torch.testing.assert_close(unit, expected)  # not dark, not saturated at 255
    torch.testing.assert_close(from_pil, expected)
    assert (unit == 1).sum() == 1
    processor = tiny()
    torch.testing.assert_close(processor(str(path))["pixel_values"], processor(values)["pixel_values"])


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 51], [255, 102]], dtype=np.uint8), [[0, 0.2], [1, 0.4]]),  # /255, not min-max
        (
            np.array([[0, 255], [510, 1020]], dtype=np.uint16),
            [[0, 0.25], [0.5, 1]],
        ),  # min-max, no clip at 255
        (np.array([[-1000, 0], [1000, 3000]], dtype=np.int16), [[0, 0.25], [0.5, 1]]),
        (np.array([[True, False], [False, True]]), [[1, 0], [0, 1]]),
        (
            np.array([[0.2, 0.3], [0.4, 0.5]], dtype=np.float32),
            [[0.2, 0.3], [0.4, 0.5]],
        ),  # inside [0, 1]: kept
        (np.array([[-1.0, 0.0], [1.0, 3.0]]), [[0, 0.25], [0.5, 1]]),
        (np.full((2, 2), 700, dtype=np.uint16), [[0, 0], [0, 0]]),
        (np.full((2, 2), 5.0), [[0, 0], [0, 0]]),
    ],
)
def test_windowing_by_dtype(array: np.ndarray, expected: list) -> None:
    unit = tiny(num_channels=1).to_unit_float(array)
    torch.testing.assert_close(unit, torch.tensor(expected, dtype=torch.float32)[None])


def test_channel_conversion() -> None:
    rgb = np.random.rand(5, 6, 3)
    luminance = tiny(num_channels=1).to_unit_float(rgb)
    expected = torch.from_numpy(rgb @ np.array(LUMA_WEIGHTS)).float()[None]
    torch.testing.assert_close(luminance, expected)
    gray = tiny(num_channels=3).to_unit_float(gradient())
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    rgba = np.concatenate([rgb, np.random.rand(5, 6, 1)], axis=-1)
    torch.testing.assert_close(tiny().to_unit_float(rgba), tiny().to_unit_float(rgb))


def test_resize_and_normalize() -> None:
    processor = tiny(image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.25, 2.0])
    image = torch.rand(3, SIDE, SIDE)
    pixel_values = processor(image)["pixel_values"][0]
    expected = (image - torch.tensor([0.5, 0.25, 0.0])[:, None, None]) / torch.tensor([0.5, 0.25, 2.0])[
        :, None, None
    ]
    torch.testing.assert_close(pixel_values, expected)
    resized = tiny(image_mean=0.0, image_std=1.0)(torch.rand(3, 50, 7))["pixel_values"]
    assert resized.min() >= 0 and resized.max() <= 1  # bicubic overshoot is clamped


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    settings = {
        "size": {"height": 24, "width": 24},
        "num_channels": 1,
        "image_mean": [0.4],
        "image_std": 0.3,
        "grid_size": 13,
        "cell_size": 6,
        "view_tokens": 4,
        "min_overlap": 0.25,
        "jitter_scale": (0.5, 0.9),
        "jitter_ratio": (0.9, 1.1),
        "brightness_contrast_prob": 0.1,
        "blur_prob": 0.2,
        "sharpen_prob": 0.6,
        "local_contrast_prob": 0.7,
        "brightness": 0.2,
        "contrast": 0.3,
        "blur_sigma": (0.5, 1.0),
        "sharpness": (1.2, 1.4),
        "local_contrast_tiles": 3,
        "local_contrast_clip": 4.0,
    }
    processor = AceImageProcessor(**settings)
    processor.save_pretrained(tmp_path)
    loaded = AceImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    for field, value in settings.items():
        assert getattr(loaded, field) == (list(value) if field == "image_mean" else value), field
    image = np.random.rand(9, 11)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    # Overrides go through __init__ and are validated.
    assert AceImageProcessor.from_pretrained(tmp_path, grid_size=20).grid_size == 20
    with pytest.raises(ValueError, match="grid_size"):
        AceImageProcessor.from_pretrained(tmp_path, grid_size=5)


def test_from_ace_config() -> None:
    config = AceConfig.from_preset("ace-vit-tiny", num_channels=1, min_overlap=0.3)
    processor = AceImageProcessor.from_ace_config(config, blur_prob=0.0)
    assert processor.size == {"height": 96, "width": 96}
    assert (processor.cell_size, processor.view_tokens, processor.grid_size) == (16, 6, 20)
    assert (processor.num_channels, processor.min_overlap, processor.blur_prob) == (1, 0.3, 0.0)
    swin = AceImageProcessor.from_ace_config(AceConfig.from_preset("ace-swin-b"))
    assert (swin.cell_size, swin.view_tokens, swin.size["height"]) == (32, 14, 448)


def test_view_geometry_defaults_are_the_default_ace_config() -> None:
    processor, config = AceImageProcessor(), AceConfig()
    assert {name: getattr(processor, name) for name in view_geometry(config)} == view_geometry(config)
    assert (processor.cell_size, processor.size["height"]) == (config.token_stride, config.image_size)
    assert processor.to_dict() == AceImageProcessor.from_ace_config(config).to_dict()


def test_every_setting_routes_through_from_pretrained(tmp_path: Path) -> None:
    """transformers passes `from_pretrained(..., key=value)` to __init__ only for the keys of `valid_kwargs`."""
    routed = set(AceImageProcessor.valid_kwargs.__annotations__)
    assert {
        *PRETRAINING_SETTING_NAMES,
        "size",
        "resize_mode",
        "num_channels",
        "image_mean",
        "image_std",
    } <= routed
    tiny().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, blur_sigma=[0.2, 0.4], local_contrast_tiles=2)
    assert (loaded.blur_sigma, loaded.local_contrast_tiles) == ((0.2, 0.4), 2)
    with pytest.raises(ValueError, match=r"AceImageProcessor\.sharpen_prob="):
        AutoImageProcessor.from_pretrained(tmp_path, sharpen_prob=2.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"size": 18}, "size"),  # not a multiple of the stride cell_size=4
        ({"size": 0}, "size"),
        ({"size": {"height": 16}}, "size"),
        ({"size": {"height": 16, "width": 20.0}}, "size"),
        ({"cell_size": 5}, "size"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"grid_size": 7}, "grid_size"),
        ({"view_tokens": 3, "cell_size": 4, "size": 12}, "view_tokens"),
        ({"num_channels": 2}, "num_channels"),
        ({"image_mean": [0.1, 0.2]}, "image_mean"),
        ({"image_std": 0.0}, "image_std"),
        ({"min_overlap": 0.0}, "min_overlap"),
        ({"blur_prob": 1.5}, "blur_prob"),
        ({"jitter_scale": (0.9, 0.5)}, "jitter_scale"),
        ({"jitter_ratio": (0.0, 1.0)}, "jitter_ratio"),
        ({"brightness": 1.0}, "brightness"),
        ({"local_contrast_clip": 0.5}, "local_contrast_clip"),
        ({"local_contrast_tiles": 0}, "local_contrast_tiles"),
        ({"sharpen_prob": -0.1}, "sharpen_prob"),
        ({"contrast": -0.1}, "contrast"),
        ({"blur_sigma": (1.0,)}, "blur_sigma"),
        ({"sharpness": [0.0, 2.0]}, "sharpness"),
        ({"pretraining": {"blur_prob": 2.0}}, "blur_prob"),
    ],
)
def test_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"AceImageProcessor\.{field}="):
        tiny(**overrides)


def truncated_png(directory: Path) -> Path:
    path = save(PIL.Image.fromarray((np.random.rand(64, 64) * 255).astype(np.uint8)), directory / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_file(directory: Path) -> Path:
    path = directory / "notes.png"
    path.write_text("not an image")
    return path


BAD_INPUTS = {
    "missing-file": (lambda d: str(d / "nowhere.png"), "nowhere.png"),
    "not-an-image": (text_file, "notes.png"),
    "truncated-png": (truncated_png, "cut.png"),
    "nan": (lambda d: np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
    "inf-tensor": (lambda d: torch.tensor([[0.0, float("inf")]]), "infinite"),
    "1d": (lambda d: np.zeros(5), "shape"),
    "4d-array": (lambda d: np.zeros((1, 4, 4, 3)), "shape"),
    "4d-tensor": (lambda d: torch.zeros(2, 3, 4, 4), "shape"),
    "zero-size": (lambda d: np.zeros((0, 5)), "zero-size"),
    "two-channels": (lambda d: np.zeros((4, 4, 2)), "channels"),
    "channels-last-tensor": (lambda d: torch.zeros(10, 10, 3), "channels"),
    "complex": (lambda d: np.zeros((4, 4), dtype=np.complex64), "dtype"),
    "strings": (lambda d: np.array([["a", "b"]]), "dtype"),
    "unsupported-type": (lambda d: {"image": 1}, "Unsupported image type dict"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(kind: str, tmp_path: Path) -> None:
    build, message = BAD_INPUTS[kind]
    image = build(tmp_path)
    with pytest.raises(ValueError, match=message):
        tiny().preprocess(image)
    with pytest.raises(ValueError, match=message):
        tiny().preprocess([np.zeros((4, 4)), image])


def test_empty_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="No images"):
        tiny().preprocess([])


def test_module_imports_only_what_remote_code_allows() -> None:
    import ace_hf.image_processing_ace as module

    path = module.__file__
    third_party = set(get_imports(path)) - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "numpy", "transformers"}, third_party
    assert set(get_relative_imports(path)) <= {"configuration_ace", "correspondence_ace"}
    tree = ast.parse(Path(path).read_text())
    assert all(node.level <= 1 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))


# ----------------------------------------------------------------------------------------- inference size


def test_per_call_size_and_mode_give_that_size() -> None:
    processor = tiny()
    images = [np.random.rand(30, 17), torch.rand(3, 50, 40)]
    for size, shape in [(24, (24, 24)), ({"height": 8, "width": 32}, (8, 32))]:
        for mode in ("resize", "shortest_edge_crop", "pad"):
            pixel_values = processor(images, size=size, resize_mode=mode, return_tensors="pt")["pixel_values"]
            assert pixel_values.shape == (2, 3, *shape), (size, mode)
    assert processor.size == {"height": SIDE, "width": SIDE} and processor.resize_mode == "resize"


def test_inference_size_is_free_of_the_view_geometry(tmp_path: Path) -> None:
    processor = tiny(size={"height": 64, "width": 48}, resize_mode="pad")
    assert processor(np.random.rand(20, 20))["pixel_values"].shape == (1, 3, 64, 48)
    views = processor.sample_views([np.random.rand(40, 40)] * 2, generator=torch.Generator().manual_seed(0))
    view_side = TINY["view_tokens"] * TINY["cell_size"]
    assert (
        views["pixel_values_small"].shape[-2:] == views["pixel_values_large"].shape[-2:] == (view_side,) * 2
    )
    tiny().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, size=512, resize_mode="shortest_edge_crop")
    assert isinstance(loaded, AceImageProcessor) and loaded.size == {"height": 512, "width": 512}
    assert (loaded.resize_mode, loaded.view_tokens, loaded.cell_size) == ("shortest_edge_crop", 4, 4)


def test_pipeline_image_processor_kwargs_size_sets_the_token_grid(tmp_path: Path) -> None:
    config = AceConfig.from_preset("ace-vit-tiny", num_hidden_layers=1, hidden_size=48, num_attention_heads=1)
    AceModel(config).save_pretrained(tmp_path)
    AceImageProcessor.from_ace_config(config).save_pretrained(tmp_path)
    extractor = pipeline(
        "image-feature-extraction",
        model=AceModel.from_pretrained(tmp_path),
        image_processor=AutoImageProcessor.from_pretrained(tmp_path),
        image_processor_kwargs={"size": {"height": 64, "width": 96}, "resize_mode": "pad"},
    )
    image = PIL.Image.fromarray((gradient(40, 70) * 255).astype(np.uint8))
    tokens = extractor(image, return_tensors=True)
    assert tokens.shape == (1, 1 + (64 // 16) * (96 // 16), 48)  # CLS + 4 x 6 patch tokens
    assert extractor(image, return_tensors=True, pool=True).shape == (1, 48)
    square = extractor(image, return_tensors=True, image_processor_kwargs={"size": 32})
    assert square.shape == (1, 1 + 2 * 2, 48)


def square_on_background(height: int, width: int, side: int) -> np.ndarray:
    """Gray float image with a white `side` x `side` square in its center."""
    image = np.full((height, width), 0.25)
    top, left = (height - side) // 2, (width - side) // 2
    image[top : top + side, left : left + side] = 1.0
    return image


def unit_output(processor: AceImageProcessor, image: np.ndarray, **kwargs) -> torch.Tensor:
    """First channel of the processor's output, back in [0, 1] (mean 0, std 1 keep the values)."""
    return processor(image, **kwargs)["pixel_values"][0, 0]


def test_resize_mode_resize_stretches_to_the_size() -> None:
    processor = tiny(image_mean=0.0, image_std=1.0)
    image = gradient(30, 50)
    stretched = F.interpolate(
        torch.from_numpy(image).float()[None, None], size=(SIDE, SIDE), mode="bicubic", antialias=True
    )[0, 0].clamp(0, 1)
    torch.testing.assert_close(unit_output(processor, image), stretched)


def test_shortest_edge_crop_keeps_the_center() -> None:
    processor = tiny(image_mean=0.0, image_std=1.0)
    image = gradient(16, 40)  # shortest edge already 16: the crop is an exact slice
    expected = torch.from_numpy(image[:, 12:28]).float()
    torch.testing.assert_close(unit_output(processor, image, resize_mode="shortest_edge_crop"), expected)
    # Downscaled by 2 first: a centered square stays a centered square, the center pixel stays white.
    cropped = unit_output(processor, square_on_background(32, 96, 16), resize_mode="shortest_edge_crop")
    assert abs(cropped[SIDE // 2, SIDE // 2] - 1.0) < 1e-5
    rows, cols = torch.nonzero(cropped > 0.6, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 11, 4, 11)


def test_pad_mode_keeps_a_square_square_with_black_borders() -> None:
    processor = tiny(size=32, image_mean=0.5, image_std=0.25)
    padded = processor(square_on_background(64, 128, 32), resize_mode="pad")["pixel_values"][0, 0]
    black = (PAD_VALUE - 0.5) / 0.25
    assert torch.all(padded[:8] == black) and torch.all(padded[24:] == black)  # 64x128 -> 16x32, centered
    assert not torch.any(padded[8:24] == black)
    rows, cols = torch.nonzero(padded > (0.6 - 0.5) / 0.25, as_tuple=True)
    assert (rows.max() - rows.min(), cols.max() - cols.min()) == (7, 7)  # 32 x 32 square -> 8 x 8 square
    assert (rows.min(), cols.min()) == (12, 12)


def test_squash_warning_fires_once_per_processor(caplog: pytest.LogCaptureFixture) -> None:
    def squash_warnings() -> int:
        return sum("squashes" in record.getMessage() for record in caplog.records)

    processor = tiny()
    with caplog.at_level(logging.WARNING):
        processor([np.random.rand(16, 16), np.random.rand(40, 41)])  # within 5 %: no warning
        processor(np.random.rand(30, 17), resize_mode="pad")
        assert squash_warnings() == 0
        processor([np.random.rand(30, 17), np.random.rand(10, 40)])
        processor(np.random.rand(30, 17))
        assert squash_warnings() == 1
        assert "resize_mode='shortest_edge_crop'" in caplog.text and "'pad'" in caplog.text
        tiny()(np.random.rand(30, 17))
        assert squash_warnings() == 2
    assert "_warned_squash" not in processor.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resize_mode": "letterbox"}, "resize_mode"),
        ({"size": 10}, "size"),
        ({"size": -16}, "size"),
        ({"size": {"height": 16, "width": 0}}, "size"),
        ({"size": {"shortest_edge": 16}}, "size"),
        ({"size": 16.0}, "size"),
    ],
)
def test_bad_per_call_size_or_mode_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"AceImageProcessor\.{field}=") as error:
        tiny()(np.random.rand(8, 8), **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(error.value)


# ----------------------------------------------------------------------------------------- saved settings


def test_saved_json_keeps_pretraining_apart(tmp_path: Path) -> None:
    tiny(resize_mode="pad", blur_prob=0.1).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert {"size", "resize_mode", "num_channels", "image_mean", "image_std", "pretraining"} <= set(saved)
    assert not set(saved) & set(PRETRAINING_SETTING_NAMES)
    pretraining = saved["pretraining"]
    assert set(pretraining) == {"about", *PRETRAINING_SETTING_NAMES}
    assert "no augmentation" in pretraining["about"]
    assert (pretraining["blur_prob"], pretraining["view_tokens"], saved["resize_mode"]) == (0.1, 4, "pad")


def test_old_flat_export_still_loads(tmp_path: Path) -> None:
    flat = {
        "image_processor_type": "AceImageProcessor",
        "size": {"height": 24, "width": 24},
        "num_channels": 1,
        "image_mean": 0.5,
        "image_std": 0.25,
        "grid_size": 13,
        "cell_size": 6,
        "view_tokens": 4,
        "min_overlap": 0.25,
        "jitter_scale": [0.5, 0.9],
        "blur_sigma": [0.5, 1.0],
        "brightness": 0.2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(flat))
    loaded = AceImageProcessor.from_pretrained(tmp_path)
    assert (loaded.size, loaded.resize_mode, loaded.num_channels) == (
        {"height": 24, "width": 24},
        "resize",
        1,
    )
    assert (loaded.grid_size, loaded.cell_size, loaded.view_tokens, loaded.min_overlap) == (13, 6, 4, 0.25)
    assert (loaded.jitter_scale, loaded.blur_sigma, loaded.brightness) == ((0.5, 0.9), (0.5, 1.0), 0.2)
    assert loaded.contrast == PretrainingSettings().contrast
    assert AceImageProcessor.from_pretrained(tmp_path, size=48).size == {"height": 48, "width": 48}
    assert loaded.to_dict()["pretraining"]["grid_size"] == 13


def test_flat_pretraining_settings_win_over_nested_ones() -> None:
    nested = {"about": "ignored", "grid_size": 12, "blur_prob": 0.9}
    processor = tiny(pretraining=nested, blur_prob=0.1)
    assert (processor.grid_size, processor.blur_prob) == (10, 0.1)  # TINY passes grid_size=10 flat
    assert AceImageProcessor(pretraining=nested, cell_size=4, view_tokens=4).grid_size == 12
    with pytest.raises(ValueError, match=r"AceImageProcessor\.pretraining: unknown setting\(s\) blur"):
        tiny(pretraining={"blur": 0.5})


# preprocessor_config.json as AceImageProcessor.from_ace_config(AceConfig.from_preset("ace-vit-tiny"), **SAVED_OVERRIDES)
# saved it when the settings were declared three times (before PretrainingSettings): it must load unchanged.
SAVED_OVERRIDES = {
    "jitter_scale": (0.5, 0.9),
    "blur_prob": 0.2,
    "sharpness": (1.2, 1.4),
    "local_contrast_tiles": 3,
    "resize_mode": "pad",
    "image_mean": [0.4, 0.4, 0.4],
}
SAVED_JSON = {
    "auto_map": {"AutoImageProcessor": "image_processing_ace.AceImageProcessor"},
    "image_mean": [0.4, 0.4, 0.4],
    "image_processor_type": "AceImageProcessor",
    "image_std": 0.252,
    "num_channels": 3,
    "pretraining": {
        "about": (
            "Used only by sample_views (ACE pretraining): view geometry and augmentation. Inference (__call__ / "
            "preprocess) applies no augmentation: it windows, fits the image to `size` by `resize_mode`, normalizes."
        ),
        "blur_prob": 0.2,
        "blur_sigma": [0.1, 2.0],
        "brightness": 0.4,
        "brightness_contrast_prob": 0.5,
        "cell_size": 16,
        "contrast": 0.4,
        "grid_size": 20,
        "jitter_ratio": [0.75, 1.3333333333333333],
        "jitter_scale": [0.5, 0.9],
        "local_contrast_clip": 2.0,
        "local_contrast_prob": 0.3,
        "local_contrast_tiles": 3,
        "min_overlap": 0.5,
        "sharpen_prob": 0.3,
        "sharpness": [1.2, 1.4],
        "view_tokens": 6,
    },
    "resize_mode": "pad",
    "size": {"height": 96, "width": 96},
}


def test_saved_nested_json_loads_with_the_same_settings(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SAVED_JSON))
    loaded = AceImageProcessor.from_pretrained(tmp_path)
    built = AceImageProcessor.from_ace_config(AceConfig.from_preset("ace-vit-tiny"), **SAVED_OVERRIDES)
    saved_settings = {key: value for key, value in SAVED_JSON["pretraining"].items() if key != "about"}
    assert {name: getattr(loaded, name) for name in PRETRAINING_SETTING_NAMES} == {
        name: tuple(value) if isinstance(value, list) else value for name, value in saved_settings.items()
    }
    assert (loaded.size, loaded.resize_mode, loaded.image_mean) == (
        {"height": 96, "width": 96},
        "pad",
        [0.4, 0.4, 0.4],
    )
    for processor, folder in ((loaded, "resaved"), (built, "built")):
        processor.save_pretrained(tmp_path / folder)
        assert json.loads((tmp_path / folder / "preprocessor_config.json").read_text()) == SAVED_JSON, folder
