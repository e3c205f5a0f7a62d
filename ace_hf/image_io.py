"""Reading images from disk or datasets cells: PNG/JPEG/TIFF through PIL, DICOM through pydicom (an extra).

One place decides what an unreadable file is and how it is reported (`load_or_skip`): pretraining, fine-tuning,
feature extraction and visualization all skip and count bad files the same way.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)
Loaded = TypeVar("Loaded")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: str | Path) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


def reads_dicom() -> bool:
    """Whether DICOM files can be read here (the [dicom] extra installs pydicom)."""
    return importlib.util.find_spec("pydicom") is not None


def readable_suffixes() -> tuple[str, ...]:
    """The file suffixes read as images here: DICOM's only when pydicom is installed."""
    return IMAGE_SUFFIXES + (DICOM_SUFFIXES if reads_dicom() else ())


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursive, sorted); DICOM files only when pydicom is installed."""
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    if not reads_dicom() and (dicom_count := sum(is_dicom(path) for path in files)):
        logger.warning(
            f"Skipping {dicom_count} DICOM file(s) in {folder}: pip install 'ace-hf[dicom]' to read them."
        )
    suffixes = readable_suffixes()
    return [path for path in files if path.suffix.lower() in suffixes]


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    return [found for path in paths for found in ([path] if path.is_file() else list_image_files(path))]


def read_dicom(source: str | Path | bytes) -> np.ndarray:
    """Pixels of a DICOM file as float32, with the modality and VOI LUTs applied and MONOCHROME1 inverted,
    so that bone is bright like every other input."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise ImportError("Reading DICOM needs pydicom: pip install 'ace-hf[dicom]'") from error
    dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    pixels = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset).astype(np.float32)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def decode_image(value: Any) -> PIL.Image.Image | np.ndarray:
    """Decode one dataset cell (an undecoded datasets Image dict, a path, or an image) eagerly, so that a
    truncated or corrupt file fails here, where it can be skipped, and not later inside a transform."""
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
    elif isinstance(value, (str, Path)):
        path, data = str(value), None
    else:
        return value
    if path is not None and is_dicom(path):
        return read_dicom(data if data is not None else path)
    try:
        image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"{path or 'image bytes'}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from None
    return image


def example_name(value: Any, index: int) -> str:
    """A human-readable name for a dataset cell, for skip reports."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, Path)):
        return str(value)
    return f"example #{index}"


def load_or_skip(value: Any, index: int, load: Callable[[Any], Loaded]) -> tuple[Loaded | None, str | None]:
    """`(load(value), None)`, or `(None, "name (ErrorType: message)")` when the file cannot be read: any error
    (PIL, pydicom, windowing) marks the file as skipped, so one bad file never stops a run."""
    try:
        return load(value), None
    except Exception as error:
        return None, f"{example_name(value, index)} ({type(error).__name__}: {error})"
