"""A real radiograph through the package: pydicom-data's PA chest film (computed radiography, 1955 x 1841,
MONOCHROME1, 15 bits stored in 16), in its four encodings, read, windowed and encoded.

Everything else in the tests is rendered from one CT; this film is a different person on a different detector.
pydicom-data is in the [dev] extra, so CI runs these; without it they are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from ace_hf import AceImageProcessor, AceModel
from ace_hf.image_io import decode_image
from tests.conftest import tiny_vit_config

pytest.importorskip("pydicom", reason="reading DICOM needs pydicom (the [dicom] extra)")
pytest.importorskip("data_store", reason="the real radiograph ships in pydicom-data (the [dev] extra)")

from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

# The same film: uncompressed (UNCI, UNCR), JPEG 2000 lossless (J2KR) and lossy (J2KI). UNCI holds the lossy
# round trip's pixels, so the I and R pairs differ by JPEG 2000's loss.
ENCODINGS = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
# The default encoder of a fresh clone (`make pretrain`), when this machine has one; never modified here.
DEFAULT_EXPORT = Path("/tmp/fresh/outputs/ace-pretrain")


def film(name: str = "RG1_UNCI.dcm") -> str:
    return get_testdata_file(name)


def windowed(name: str = "RG1_UNCI.dcm") -> np.ndarray:
    """The film as the package shows it to a model: [H, W] in [0, 1]."""
    return AceImageProcessor(num_channels=1).to_unit_float(decode_image(film(name)))[0].numpy()


def test_the_film_is_a_15_bit_monochrome1_chest_radiograph() -> None:
    dataset = dcmread(film())
    assert (dataset.PhotometricInterpretation, dataset.BitsAllocated, dataset.BitsStored) == (
        "MONOCHROME1",
        16,
        15,
    )
    stored = dataset.pixel_array
    assert stored.shape == (1955, 1841) and stored.dtype == np.uint16
    assert stored.max() < 2**15  # 15 bits stored: a window by the uint16 range would leave it dim


def test_windowing_fills_the_range_with_bone_bright_and_lungs_dark() -> None:
    image = windowed()
    assert image.shape == (1955, 1841)
    assert image.min() == 0.0 and image.max() == 1.0  # by what is stored, not by the 16-bit container
    assert ((image < 0.01) | (image > 0.99)).mean() < 0.01  # hardly anything clipped
    low, median, high = np.percentile(image, [5, 50, 95])
    assert high - low > 0.4 and 0.3 < median < 0.9
    height, width = image.shape
    rows = slice(height // 3, 2 * height // 3)  # mid chest: hila to the domes of the diaphragm
    spine = image[rows, width // 2 - 40 : width // 2 + 40].mean()
    right_lung = image[
        rows, width // 4 - 40 : width // 4 + 40
    ].mean()  # the patient's right: the image's left
    left_lung = image[rows, 3 * width // 4 - 40 : 3 * width // 4 + 40].mean()
    assert max(right_lung, left_lung) < spine - 0.2  # MONOCHROME1 inverted: dense is bright


@pytest.mark.parametrize("name", ENCODINGS[1:])
def test_every_encoding_windows_to_the_same_pixels(name: str) -> None:
    difference = np.abs(windowed(name) - windowed())
    assert difference.mean() < 0.005 and np.percentile(difference, 99) < 0.02


def features(model: AceModel, processor: AceImageProcessor, image) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        outputs = model(**processor(image))
    return outputs.pooler_output[0], outputs.patch_embeddings[0]


def encoders(tmp_path: Path) -> list[Path]:
    """A tiny random ACE encoder saved with its processor, and the fresh default export when present."""
    config = tiny_vit_config()
    AceModel(config).save_pretrained(tmp_path)
    AceImageProcessor.from_ace_config(config, size=64).save_pretrained(tmp_path)
    return [tmp_path] + ([DEFAULT_EXPORT] if (DEFAULT_EXPORT / "config.json").is_file() else [])


def test_encoders_give_finite_features_directly_and_through_the_pipeline(tmp_path: Path) -> None:
    pixels = decode_image(film())
    png = (
        tmp_path / "film.png"
    )  # what a user exporting the film for the pipeline writes: 8 bits, it opens RGB
    PIL.Image.fromarray((windowed() * 255).round().astype(np.uint8)).save(png)
    for folder in encoders(tmp_path / "tiny"):
        model = AceModel.from_pretrained(folder).eval()
        processor = AceImageProcessor.from_pretrained(folder)
        pooled, dense = features(model, processor, pixels)
        side = processor.size["height"] // model.config.token_stride
        assert dense.shape == (model.config.hidden_size, side, side)
        assert torch.isfinite(pooled).all() and torch.isfinite(dense).all()

        extractor = pipeline("image-feature-extraction", model=model, image_processor=processor)
        piped = extractor(str(png), return_tensors=True, pool=True)[0]
        assert torch.isfinite(piped).all()
        # 8-bit rounding of the windowed film is all that separates the pipeline from the DICOM.
        assert torch.cosine_similarity(piped, pooled, dim=0) > 0.99
