"""Digitally reconstructed radiographs: PA chest films projected through an attenuation volume.

Renders posterior-anterior radiographs of a chest CT (`ace_hf.synthetic.ct`) in a given pose, exposure and
processing, projects labels and 3-D points with the same geometry (exact targets for evaluation), and draws
the random poses and exposures of the built-in renders.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_FOV_MM = 330.0  # square field of view at the isocenter: the CT's full head-feet extent
DEFAULT_SOURCE_DISTANCE_MM = 1650.0  # source to isocenter of a 1.8 m PA chest setup
SHARPEN_SIGMA_MM = 8.0  # unsharp-mask scale of radiograph processing: enhances rib-sized detail


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
