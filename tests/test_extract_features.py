"""examples/extract_features.py: features of a folder of images, in both formats, with unreadable files skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.numpy import load_file

from ace_hf import AceImageProcessor, AceModel
from tests.conftest import load_example, tiny_vit_config

IMAGES = ["a.png", "sub/b.png", "sub/c16.png"]


def load_script():
    return load_example("extract_features")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = tiny_vit_config()
    folder = tmp_path_factory.mktemp("model")
    AceModel(config).save_pretrained(folder)
    AceImageProcessor.from_ace_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8-bit grayscale, 8-bit RGB and 16-bit grayscale PNGs of different sizes, and a corrupt PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    PIL.Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(root / "a.png")
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "sub" / "b.png")
    PIL.Image.fromarray(rng.integers(0, 4096, (60, 44), dtype=np.uint16)).save(root / "sub" / "c16.png")
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def expected(model_dir: Path, image_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(global [C], patch [C, h, w]) per image from the model called directly, one image at a time."""
    model = AceModel.from_pretrained(model_dir).eval()
    processor = AceImageProcessor.from_pretrained(model_dir)
    features = {}
    with torch.no_grad():
        for name in IMAGES:
            outputs = model(**processor(image_dir / name, return_tensors="pt"))
            features[name] = (outputs.pooler_output[0].numpy(), outputs.patch_embeddings[0].numpy())
    return features


def run(model_dir: Path, image_dir: Path, output: Path, fmt: str, caplog: pytest.LogCaptureFixture) -> int:
    argv = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(output)]
    with caplog.at_level(logging.INFO):
        return load_script().main([*argv, "--format", fmt, "--batch_size", "2", "--device", "cpu"])


def assert_skip_reported(caplog: pytest.LogCaptureFixture) -> None:
    assert "Wrote features of 3 image(s)" in caplog.text
    assert "Skipped 1 unreadable file(s)" in caplog.text
    assert "broken.png" in caplog.text


def test_npy_features_mirror_the_folders_and_match_the_model(
    model_dir, image_dir, expected, tmp_path, caplog
):
    assert run(model_dir, image_dir, tmp_path, "npy", caplog) == 0

    written = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.npy"))
    assert written == sorted(f"{name}.{kind}.npy" for name in IMAGES for kind in ("global", "patch"))
    for name, (global_embedding, patch_map) in expected.items():
        saved_global, saved_patch = (np.load(tmp_path / f"{name}.{kind}.npy") for kind in ("global", "patch"))
        assert saved_global.shape == (32,) and saved_patch.shape == (32, 4, 4)
        np.testing.assert_allclose(saved_global, global_embedding, atol=1e-5)
        np.testing.assert_allclose(saved_patch, patch_map, atol=1e-5)
    assert_skip_reported(caplog)


def test_safetensors_features_and_index_match_the_model(model_dir, image_dir, expected, tmp_path, caplog):
    assert run(model_dir, image_dir, tmp_path, "safetensors", caplog) == 0

    features = load_file(tmp_path / "features.safetensors")
    index = json.loads((tmp_path / "features_index.json").read_text())
    assert (
        set(features) == set(index) == {f"{name}.{kind}" for name in IMAGES for kind in ("global", "patch")}
    )
    for name, (global_embedding, patch_map) in expected.items():
        assert index[f"{name}.global"] == index[f"{name}.patch"] == name
        assert features[f"{name}.global"].shape == (32,) and features[f"{name}.patch"].shape == (32, 4, 4)
        np.testing.assert_allclose(features[f"{name}.global"], global_embedding, atol=1e-5)
        np.testing.assert_allclose(features[f"{name}.patch"], patch_map, atol=1e-5)
    assert_skip_reported(caplog)


def test_size_and_resize_mode_reach_the_processor(model_dir, image_dir, tmp_path, caplog):
    argv = ["--size", "48x64", "--resize_mode", "pad", "--format", "npy", "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        status = load_script().main(
            [
                "--model_name_or_path",
                str(model_dir),
                "--input",
                str(image_dir),
                "--output",
                str(tmp_path),
                *argv,
            ]
        )
    assert status == 0
    model = AceModel.from_pretrained(model_dir).eval()
    processor = AceImageProcessor.from_pretrained(model_dir)
    for name in IMAGES:
        inputs = processor(image_dir / name, size={"height": 48, "width": 64}, resize_mode="pad")
        with torch.no_grad():
            expected = model(**inputs).patch_embeddings[0].numpy()
        saved = np.load(tmp_path / f"{name}.patch.npy")
        assert saved.shape == (32, 6, 8)  # 48 x 64 px at stride 8
        np.testing.assert_allclose(saved, expected, atol=1e-5)


@pytest.mark.parametrize(("text", "size"), [("40", 40), ("48x64", {"height": 48, "width": 64})])
def test_size_argument_forms(text: str, size, model_dir, image_dir, tmp_path) -> None:
    base = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    script = load_script()
    args = script.parse_args([*base, "--size", text])
    assert args.size == size and script.processor_overrides(args) == {"size": size}
    assert script.processor_overrides(script.parse_args(base)) == {}


@pytest.mark.parametrize(
    "argv", [["--size", "0"], ["--size", "4x"], ["--size", "big"], ["--resize_mode", "fit"]]
)
def test_bad_size_or_mode_arguments_are_refused(argv, model_dir, image_dir, tmp_path) -> None:
    base = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    with pytest.raises(SystemExit):
        load_script().parse_args([*base, *argv])


def test_size_off_the_stride_fails_before_reading_images(model_dir, image_dir, tmp_path) -> None:
    argv = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    with pytest.raises(ValueError, match=r"AceImageProcessor\.size=.*multiples of the model's token stride"):
        load_script().main([*argv, "--size", "50", "--device", "cpu"])


@pytest.mark.parametrize("kind", ["a file", "unwritable"])
def test_an_unusable_output_fails_in_one_line_before_the_model_loads(
    kind, image_dir, tmp_path, caplog
) -> None:
    """A missing model proves the order: the output is refused before anything is loaded."""
    output = Path("/proc/forbidden")
    if kind == "a file":
        output = tmp_path / "taken"
        output.write_text("x")
    status = run(tmp_path / "no-such-model", image_dir, output, "npy", caplog)
    assert status == 2
    assert ("is a file, not a folder" if kind == "a file" else "is not writable") in caplog.text
    assert "Traceback" not in caplog.text
