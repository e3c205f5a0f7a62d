"""ace_hf.visualization and ace_hf.visualize (examples/visualize.py): colours mean embeddings, similarity peaks at
the query, maps land on the right pixels, and both pictures are written at the expected size; each user mistake is
one `error:` line before any model loads, and earlier pictures are kept unless --overwrite_output_dir."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ace_hf import AceImageProcessor, AceModel
from ace_hf.commands.visualize import VisualizationArguments, main
from ace_hf.visualization import (
    GAP,
    LABEL_HEIGHT,
    heat_colors,
    image_grid,
    mark_point,
    overlay,
    pca_rgb,
    query_embedding,
    similarity_maps,
    to_pil,
)
from ace_hf.visualize import GeometryError, visualize
from tests.conftest import EXAMPLES, tiny_vit_config
from tests.test_extract_features import assert_one_error_line, run_command


def colour_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


# ----------------------------------------------------------------------------------------------------- pca_rgb


def test_pca_identical_tokens_same_colour_opposite_tokens_far_apart() -> None:
    channels = 8
    base = 0.3 * torch.randn(6, channels)
    direction = torch.zeros(channels)
    direction[0] = 3.0
    # +v, +v, -v, -v and +/- noise: the mean is zero, so -v is v mirrored through the centre of the PCA.
    tokens = torch.cat([direction[None], direction[None], -direction[None], -direction[None], base, -base])
    embeddings = tokens.T.reshape(1, channels, 4, 4)
    rgb = pca_rgb(embeddings)
    assert rgb.shape == (1, 4, 4, 3) and rgb.dtype == torch.uint8
    flat = rgb.reshape(-1, 3)
    assert torch.equal(flat[0], flat[1]) and torch.equal(flat[2], flat[3])
    assert colour_distance(flat[0], flat[2]) > 200  # first component saturates at both ends


def test_pca_colours_are_comparable_across_images() -> None:
    """The same token gets the same colour in two images whose other tokens differ a lot (a per-image fit or
    scaling would colour it differently)."""
    channels = 6
    first = torch.randn(channels, 3, 3)
    second = torch.randn(channels, 3, 3) + 5 * torch.randn(channels, 1, 1)
    second[:, 2, 0] = first[:, 1, 1]
    rgb = pca_rgb(torch.stack([first, second]))
    assert torch.equal(rgb[0, 1, 1], rgb[1, 2, 0])
    alone = pca_rgb(first[None])  # fitted on one image only, the same token gets another colour
    assert not torch.equal(alone[0, 1, 1], rgb[0, 1, 1])


def test_pca_foreground_only_fits_and_colours_foreground() -> None:
    embeddings = torch.randn(2, 5, 3, 3)
    foreground = torch.rand(2, 3, 3) > 0.3
    embeddings[~foreground.unsqueeze(1).expand_as(embeddings)] = 1e6  # huge background must not matter
    rgb = pca_rgb(embeddings, foreground)
    assert (rgb[~foreground] == 0).all()
    reference = pca_rgb(embeddings.permute(0, 2, 3, 1)[foreground].T.reshape(1, 5, -1, 1))
    assert torch.equal(rgb[foreground], reference.reshape(-1, 3))


# ------------------------------------------------------------------------------------------ query / similarity


def test_similarity_is_one_at_the_query_token() -> None:
    embeddings = torch.randn(3, 16, 4, 5)
    maps = similarity_maps(embeddings[1, :, 2, 3], embeddings)
    assert maps.shape == (3, 4, 5)
    assert maps[1, 2, 3] == pytest.approx(1.0, abs=1e-6)
    assert maps.max() <= 1 + 1e-6 and maps.min() >= -1 - 1e-6


def test_query_embedding_at_token_centres_and_between() -> None:
    stride = 8
    embeddings = torch.randn(16, 4, 5)
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        centre = query_embedding(embeddings, (i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5, stride)
        torch.testing.assert_close(centre, embeddings[:, i, j])
    halfway = query_embedding(
        embeddings, 1.5 * stride - 0.5, 2 * stride - 0.5, stride
    )  # between (1,1) and (1,2)
    torch.testing.assert_close(halfway, (embeddings[:, 1, 1] + embeddings[:, 1, 2]) / 2)
    torch.testing.assert_close(
        query_embedding(embeddings, 0, 0, stride), embeddings[:, 0, 0]
    )  # border: clamped


# ------------------------------------------------------------------------------------------------ drawing


def test_overlay_sizes_and_token_blocks() -> None:
    image = torch.zeros(40, 48)
    rgb = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8)
    picture = overlay(image, rgb, alpha=1.0)
    assert picture.size == (48, 40) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    assert (pixels[:8, :8] == rgb[0, 0].numpy()).all()  # one token = one flat 8 x 8 block
    assert (pixels[32:, 40:] == rgb[4, 5].numpy()).all()

    heat = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    picture = overlay(image, heat, alpha=1.0, value_range=(0.0, 29.0))
    assert picture.size == (48, 40)
    pixels = np.asarray(picture).astype(float)
    low, high = (heat_colors(np.array(v)) * 255 for v in (0.0, 1.0))
    np.testing.assert_allclose(pixels[0, 0], low, atol=1)  # before the first token centre: the lowest value
    np.testing.assert_allclose(pixels[-1, -1], high, atol=1)
    half = overlay(torch.ones(40, 48), heat, alpha=0.5)  # white image, half blended
    assert np.asarray(half).min() >= 127


def test_image_grid_and_mark_point() -> None:
    tile = to_pil(torch.full((32, 32), 0.5))
    marked = mark_point(tile, 10, 20)
    assert marked.getpixel((20, 10)) == (0, 255, 0) and tile.getpixel((20, 10)) == (128, 128, 128)
    wide = PIL.Image.new("RGB", (20, 16))
    grid = image_grid([[tile, marked], [wide]], labels=["a", "b"])
    assert grid.size == (2 * 32 + 3 * GAP, 32 + 16 + 2 * LABEL_HEIGHT + 3 * GAP)
    assert image_grid([[tile, marked], [wide]]).size == (2 * 32 + 3 * GAP, 32 + 16 + 3 * GAP)
    with pytest.raises(ValueError, match="labels"):
        image_grid([[tile]], labels=["a", "b"])


# --------------------------------------------------------------------------------------------- the workflow


@pytest.fixture
def models_and_images(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A model saved with its processor, one without (the processor its config implies), and two images."""
    config = tiny_vit_config()
    with_processor, without_processor = tmp_path / "model_a", tmp_path / "model_b"
    AceModel(config).save_pretrained(with_processor)
    AceImageProcessor.from_ace_config(config).save_pretrained(with_processor)
    AceModel(config).save_pretrained(without_processor)  # falls back to the processor its config implies
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(images / "a.png")
    PIL.Image.fromarray(rng.integers(0, 4096, (60, 44), dtype=np.uint16)).save(images / "b16.png")
    return with_processor, without_processor, images


def test_visualize_end_to_end(models_and_images, tmp_path: Path) -> None:
    with_processor, without_processor, images = models_and_images
    args = VisualizationArguments(
        model_name_or_path=[str(with_processor), str(without_processor)],
        images=[images],
        query=[5, 20],
        random_init=True,
        output_dir=tmp_path / "out",
    )
    assert visualize(args) == [tmp_path / "out" / "pca.png", tmp_path / "out" / "similarity.png"]

    side, tiles = tiny_vit_config().image_size, 2  # the processor's size; two images per row
    width = tiles * side + (tiles + 1) * GAP
    row = side + LABEL_HEIGHT + GAP
    # pca.png: the inputs, then 2 models + the random-init reference; similarity.png: one row per encoder
    for name, rows in (("pca.png", 4), ("similarity.png", 3)):
        with PIL.Image.open(tmp_path / "out" / name) as picture:
            assert picture.size == (width, rows * row + GAP), name


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any weights fails the test: proves a check ran before."""
    monkeypatch.setattr("ace_hf.visualize.AceModel.from_pretrained", refuse_to_load)


def test_a_size_off_the_token_stride_is_one_error_line(
    models_and_images, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads
) -> None:
    with_processor, _, images = models_and_images
    argv = ["--model_name_or_path", str(with_processor), "--images", str(images / "a.png"), "--size", "20"]
    status, stderr = run_command(["visualize", *argv, "--output_dir", str(tmp_path / "bad")], capsys)
    assert status == 1
    assert_one_error_line(
        stderr, "error: --size 20 is not a multiple of model_a's token stride 8", "size is 16 or 24"
    )
    args = VisualizationArguments([str(with_processor)], tmp_path / "bad", images=[images], query=[40, 0])
    with pytest.raises(GeometryError, match="outside the 32 x 32 image"):
        visualize(args)


def test_a_missing_local_model_is_a_usage_error_at_once(
    models_and_images, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The second of two encoders is not there: usage and one error line naming it, exit 2."""
    with_processor, _, _ = models_and_images
    missing = tmp_path / "model_c"
    argv = ["visualize", "--model_name_or_path", str(with_processor), str(missing), "--output_dir", "out"]
    status, stderr = run_command(argv, capsys)
    assert status == 2
    assert_one_error_line(stderr, f"ace-hf visualize: error: --model_name_or_path {missing}: no such")


def test_earlier_pictures_are_kept_unless_overwrite_output_dir(
    models_and_images, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_processor, _, images = models_and_images
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "pca.png").write_bytes(b"an earlier picture")
    argv = ["visualize", "--model_name_or_path", str(with_processor), "--images", str(images)]
    argv += ["--output_dir", str(output_dir), "--device", "cpu"]
    with monkeypatch.context() as patch:
        patch.setattr("ace_hf.visualize.AceModel.from_pretrained", refuse_to_load)
        status, stderr = run_command(argv, capsys)
    assert status == 1
    assert_one_error_line(stderr, f"error: --output_dir {output_dir} already holds earlier results (pca.png)")
    assert (output_dir / "pca.png").read_bytes() == b"an earlier picture"
    assert run_command([*argv, "--overwrite_output_dir"], capsys)[0] == 0
    with PIL.Image.open(output_dir / "pca.png") as picture:
        picture.verify()


@pytest.mark.parametrize(
    "argv", [["--query", "5"], ["--size", "0"], ["--images", "missing.png"], ["--heldout", "0"]]
)
def test_bad_arguments_are_refused(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A Hub-shaped model id passes the model check, so each refusal is the option's own."""
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", "org/model", "--output_dir", str(tmp_path), *argv])
    assert_one_error_line(capsys.readouterr().err, f"error: {argv[0]}")


def test_script_smoke(models_and_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/visualize.py only parses and calls ace_hf.commands.visualize.main: its flags and exit status."""
    with_processor, _, images = models_and_images
    argv = ["--model_name_or_path", str(with_processor), "--images", str(images / "a.png")]
    monkeypatch.setattr(
        sys, "argv", ["visualize.py", *argv, "--query", "5", "20", "--output_dir", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(EXAMPLES / "visualize.py"), run_name="__main__")
    assert exited.value.code == 0
    assert (tmp_path / "pca.png").is_file() and (tmp_path / "similarity.png").is_file()
