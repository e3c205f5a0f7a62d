"""ace_hf.image_io and ace_hf.pretraining.data: decoding (DICOM too), bad-file handling and per-example seeding of the view pairs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace_hf import AceImageProcessor
from ace_hf.image_io import decode_image, list_image_files, read_dicom
from ace_hf.pretraining import PretrainingArguments
from ace_hf.pretraining.data import ViewPairCollator, example_seed, load_pretraining_dataset
from tests.conftest import tiny_vit_config


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, slope: float, intercept: float) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == pixels.shape


def _collator(**overrides) -> ViewPairCollator:
    return ViewPairCollator(AceImageProcessor.from_ace_config(tiny_vit_config()), **overrides)


def _example(index: int, seed: int = 0) -> dict:
    pixels = np.random.default_rng(seed + index).integers(0, 255, (60, 60), dtype=np.uint8)
    return {"index": index, "image": {"bytes": _png_bytes(pixels), "path": f"img{index}.png"}}


def test_read_dicom_applies_rescale_and_inverts_monochrome1(tmp_path: Path) -> None:
    stored = np.array([[0, 100], [2000, 4095]])
    _write_dicom(tmp_path / "a.dcm", stored, "MONOCHROME1", slope=2.0, intercept=-100.0)
    _write_dicom(tmp_path / "b.dcm", stored, "MONOCHROME2", slope=1.0, intercept=0.0)
    rescaled = 2.0 * stored - 100.0
    np.testing.assert_allclose(read_dicom(tmp_path / "a.dcm"), rescaled.max() - rescaled)  # bone stays bright
    np.testing.assert_allclose(read_dicom(tmp_path / "b.dcm"), stored)
    np.testing.assert_allclose(read_dicom((tmp_path / "b.dcm").read_bytes()), stored)


def test_decode_image_reads_undecoded_cells_paths_and_fails_on_truncated_files(tmp_path: Path) -> None:
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    data = _png_bytes(pixels)
    decoded = decode_image({"bytes": data, "path": "x.png"})
    assert decoded.mode == "I;16" and np.array_equal(np.array(decoded), pixels)
    (tmp_path / "x.png").write_bytes(data)
    assert np.array_equal(np.array(decode_image(str(tmp_path / "x.png"))), pixels)
    with pytest.raises(OSError):
        decode_image({"bytes": data[: len(data) // 2], "path": "cut.png"})


def test_collator_replaces_bad_images_and_names_them() -> None:
    broken = {"index": 7, "image": {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": "/data/broken.png"}}
    batch = _collator()([_example(0), broken, _example(2)])
    assert batch["pixel_values_large"].shape == (3, 3, 32, 32)  # same batch size on every process
    assert batch["sample_ids"].tolist() == [0, 2, -1]
    assert len(batch["skipped"]) == 1 and "/data/broken.png" in batch["skipped"][0]
    assert batch["skipped_files"] == ["/data/broken.png"]  # the name alone: a file is counted once per run
    with pytest.raises(ValueError, match="Every image of a batch failed"):
        _collator()([broken])


def test_collator_skips_a_corrupt_dicom_and_seeds_the_filler_by_the_skipped_example(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    (tmp_path / "junk.dcm").write_bytes(b"garbage")
    batch = _collator()([_example(0), {"index": 5, "image": str(tmp_path / "junk.dcm")}])
    assert "junk.dcm" in batch["skipped"][0] and batch["sample_ids"].tolist() == [0, -1]
    # The filler reuses image 0 but draws its own views, so the batch holds no duplicate pair.
    assert not torch.equal(batch["pixel_values_small"][0], batch["pixel_values_small"][1])


def test_views_depend_only_on_seed_epoch_and_example() -> None:
    examples = [_example(0), _example(1)]
    first = _collator(seed=3)(examples)
    reordered = _collator(seed=3)(examples[::-1])
    torch.testing.assert_close(first["pixel_values_small"][0], reordered["pixel_values_small"][1])
    torch.testing.assert_close(first["view_origins"][0], reordered["view_origins"][1])
    other_epoch = _collator(seed=3, epoch=1)(examples)
    assert not torch.equal(first["pixel_values_small"], other_epoch["pixel_values_small"])
    assert example_seed(0, 0, 1) != example_seed(0, 1, 0) != example_seed(1, 0, 0)


def test_image_folder_with_dicom_files_is_listed_and_decoded(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(0)
    _write_dicom(tmp_path / "a.dcm", rng.integers(0, 4096, (40, 40)), "MONOCHROME2", 1.0, 0.0)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [path.name for path in list_image_files(tmp_path)] == ["a.dcm", "b.png"]
    dataset, description = load_pretraining_dataset(train_dir=str(tmp_path))
    assert len(dataset) == 2 and str(tmp_path) in description
    batch = _collator()([{"index": i, "image": dataset[i]["image"]} for i in range(2)])
    assert batch["skipped"] == [] and batch["sample_ids"].tolist() == [0, 1]


def test_dataset_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):  # refused with the arguments, before any loading
        PretrainingArguments(train_dir=str(tmp_path / "missing"))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--image_column 'pixels' is not a column"):
        load_pretraining_dataset(train_dir=str(tmp_path), image_column="pixels")


def test_a_decompression_bomb_is_a_clear_error_naming_the_file(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL refuses images over twice the limit
    bomb = {"index": 1, "image": {"bytes": _png_bytes(np.zeros((100, 100), np.uint8)), "path": "bomb.png"}}
    with pytest.raises(ValueError, match=r"bomb\.png: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        decode_image(bomb["image"])
    with pytest.warns(Image.DecompressionBombWarning):  # 60 x 60 is only over the warning limit
        batch = _collator()([_example(0), bomb])
    assert "bomb.png" in batch["skipped"][0]  # in training it is skipped and counted like any bad file


def test_images_smaller_than_the_grid_are_upsampled_with_one_warning(caplog) -> None:
    collator = _collator()
    side = collator.processor.grid_size * collator.processor.cell_size
    small = np.random.default_rng(0).integers(0, 255, (side // 2, side // 2), dtype=np.uint8)
    examples = [
        {"index": i, "image": {"bytes": _png_bytes(small), "path": f"small{i}.png"}} for i in range(2)
    ]
    with caplog.at_level("WARNING", logger="ace_hf.pretraining.data"):
        large = np.zeros((side, side + 8), np.uint8)
        collator([{"index": 5, "image": {"bytes": _png_bytes(large), "path": "large.png"}}])  # no warning
        assert not caplog.records
        for _ in range(2):
            batch = collator(examples)
    assert batch["pixel_values_large"].shape[0] == 2 and batch["skipped"] == []
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and f"small0.png is {side // 2} x {side // 2} px" in warnings[0]
