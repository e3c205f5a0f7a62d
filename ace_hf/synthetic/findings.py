"""Controllable findings inserted into the chest CT before rendering: image-level labels we can justify.

A radiograph rendered from `insert_findings(ct, ...)` shows a finding exactly when it was inserted, so an
evaluation task (does the film show a nodule, an effusion, an enlarged heart?) has ground truth by
construction. Each finding changes the attenuation volume the way the disease changes the patient, and
the PA film then shows it through the same projection as the normal anatomy:

- nodule: a solid soft-tissue sphere in aerated lung, a round opacity over the lung field;
- pleural_effusion: water in the dependent pleural space, a basal opacity with a meniscus;
- cardiomegaly: a heart enlarged in the axial plane, a wider cardiac shadow (cardiothoracic ratio up).

Every random draw comes from the caller's generator.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .ct import ANATOMY_GROUPS, MU_WATER, ChestCT, dilate

FINDINGS = ("nodule", "pleural_effusion", "cardiomegaly")
MU_SOFT_TISSUE = MU_WATER * 1.05  # ~50 HU: solid nodule, myocardium and blood without contrast
NODULE_EDGE_MM = 2.0  # width of the nodule's soft margin: partial volume, not a cut-out disc
OPEN_LUNG = 0.5  # least share of aerated lung along the PA ray through a nodule's centre
MENISCUS = 0.6  # the fluid surface at the lung's medial centre lies this fraction lower than at the wall
SIDES = ("right", "left")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))


def _mask(ct: ChestCT, patterns: tuple[str, ...]) -> torch.Tensor:
    """Voxels whose TotalSegmentator name matches one of the fnmatch `patterns` (one comparison per id:
    several times faster than `torch.isin` or a lookup table on uint8 labels)."""
    mask = torch.zeros_like(ct.labels, dtype=torch.bool)
    for sid, name in ct.structures.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            mask |= ct.labels == sid
    return mask


def _bounding_box(mask: torch.Tensor) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty 3-D mask."""
    index = mask.nonzero()
    return tuple(
        slice(int(lo), int(hi) + 1) for lo, hi in zip(index.min(0).values, index.max(0).values, strict=True)
    )


def _enlarge_heart(ct: ChestCT, mu: torch.Tensor, aerated: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale the heart about its centroid in the axial (RL, AP) plane, displacing lung and unlabelled
    tissue less dense than it inside the body (fat): bone, airways and vessels stay.

    New voxels are blended towards soft tissue by the interpolated heart mask (a partial-volume edge).
    Returns the changed voxels.
    """
    heart = _mask(ct, ANATOMY_GROUPS["heart"])
    index = heart.nonzero()
    centre = index[:, 1:].float().mean(0)
    low, high = index.min(0).values, index.max(0).values + 1
    # Target box: the heart's box scaled about the centroid, plus a voxel of margin for the soft edge.
    shape = torch.tensor(heart.shape[1:])
    start = ((centre + (low[1:] - centre) * scale).floor().long() - 1).clamp(min=0)
    stop = torch.minimum((centre + (high[1:] - centre) * scale).ceil().long() + 1, shape)
    rl = torch.arange(int(start[0]), int(stop[0]), dtype=torch.float32)
    ap = torch.arange(int(start[1]), int(stop[1]), dtype=torch.float32)
    # Inverse map: target voxel p shows the heart at centre + (p - centre) / scale (grid_sample, align_corners
    # True: -1 and 1 are the first and last voxel centres; x = AP, y = RL).
    src_rl = (centre[0] + (rl - centre[0]) / scale) / (shape[0] - 1) * 2 - 1
    src_ap = (centre[1] + (ap - centre[1]) / scale) / (shape[1] - 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(src_ap, src_rl, indexing="xy"), -1)
    slices = slice(int(low[0]), int(high[0]))
    source = heart[slices, None].float()
    weight = F.grid_sample(source, grid.expand(len(source), -1, -1, -1), align_corners=True)[:, 0]

    box = (slices, slice(int(start[0]), int(stop[0])), slice(int(start[1]), int(stop[1])))
    displaceable = (mu[box] > 0) & (mu[box] < MU_SOFT_TISSUE)  # inside the body, less dense than heart
    weight = weight * ((aerated[box] | (ct.labels[box] == 0)) & displaceable & ~heart[box])
    mu[box] += weight * (MU_SOFT_TISSUE - mu[box])
    changed = torch.zeros_like(heart)
    changed[box] = weight > 0
    return changed


def _box_position(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Position along in-plane `axis` (1 or 2) within each slice's extent of `mask`: -1 first, 1 last.

    Shaped to broadcast over the volume: [SI, n, 1] for axis 1, [SI, 1, n] for axis 2.
    """
    coords = torch.arange(mask.shape[axis], dtype=torch.float32)
    present = mask.any(3 - axis)
    first = torch.where(present, coords, len(coords)).amin(1, keepdim=True)
    last = torch.where(present, coords, -1).amax(1, keepdim=True)  # empty slice: finite, unused
    position = (coords - (first + last) / 2) / ((last - first) / 2).clamp(min=0.5)
    return position.clamp(-1, 1).unsqueeze(3 - axis)


def _add_effusion(
    mu: torch.Tensor, lung: torch.Tensor, aerated: torch.Tensor, side: str, height: float
) -> torch.Tensor:
    """Fill the aerated `lung` (one side) below a curved fluid surface with water; returns the wet voxels.

    Upright, pleural fluid sinks to the lung base: a small effusion fills the costophrenic recesses
    (blunted angle), a larger one hides the hemidiaphragm under a homogeneous opacity. Fluid climbs the
    pleura along the chest wall, so its surface is a meniscus: highest laterally, anteriorly and
    posteriorly, `MENISCUS` lower at the lung's medial centre. On the PA film the upper border is
    therefore concave upwards, rising towards the lateral wall, and its top fades (the rays there cross
    fluid only near the front and back walls): not the horizontal line of a hydropneumothorax.

    The surface is `height` of the lung's head-feet extent above its lowest point (the posterior recess)
    at the wall; the slice it crosses is filled by the fraction below it (partial volume, no staircase).
    The recess lies well below the dome and the lateral angle: below about a quarter of the extent the
    fluid barely shows on a PA film, like a real effusion under ~200 ml.
    """
    index = lung.nonzero()
    top, bottom = int(index[:, 0].min()), int(index[:, 0].max())
    # Only the slices the surface can reach (it is highest at the wall): a fraction of the volume.
    wet = slice(max(math.floor(bottom - height * (bottom - top) - 0.5), 0), bottom + 1)
    lung, aerated = lung[wet], aerated[wet]
    # Per slice, each voxel's position in the lung's box: 0 medially, 1 at the lateral chest wall;
    # -1 anteriorly, 1 posteriorly.
    rl = _box_position(lung, 1)
    lateral = (1 - rl if side == "right" else 1 + rl) / 2  # the patient's right is at low RL indices
    ap = _box_position(lung, 2)
    periphery = torch.maximum(lateral, ap.abs()) ** 2
    level = bottom - height * (1 - MENISCUS * (1 - periphery)) * (bottom - top)
    si = torch.arange(wet.start, wet.stop)
    fraction = (si[:, None, None] - level + 0.5).clamp(0, 1) * (lung & aerated)
    mu[wet] += fraction * (MU_WATER - mu[wet])
    fluid = torch.zeros_like(mu, dtype=torch.bool)
    fluid[wet] = fraction > 0
    return fluid


def _add_nodule(
    mu: torch.Tensor,
    aerated: torch.Tensor,
    spacing: tuple[float, float, float],
    diameter_mm: float,
    generator: torch.Generator,
) -> None:
    """Put a solid soft-tissue sphere with a soft edge wholly inside the `aerated` lung.

    A solid nodule has the density of soft tissue, so against the air of the lung it projects as a round,
    well-defined opacity. Its centre lies where the PA ray crosses mostly aerated lung (`OPEN_LUNG` of the
    body along it): in the open lung fields, not in the lung behind the heart, below the domes of the
    diaphragm or behind fluid, where a film hides it.
    """
    radius = diameter_mm / 2
    reach = tuple(math.ceil((radius + NODULE_EDGE_MM / 2) / s) for s in spacing)
    crop = _bounding_box(aerated)
    region = aerated[crop]
    # Centres whose box around the sphere lies in the crop and in aerated lung, on an open ray.
    room = torch.zeros_like(region)
    room[tuple(slice(r, -r) for r in reach)] = True
    open_ray = aerated.sum(2) >= OPEN_LUNG * (mu > 0).sum(2)
    candidates = (room & region & ~dilate(~region, reach) & open_ray[crop[:2]][..., None]).nonzero()
    if len(candidates) == 0:
        raise ValueError(f"no room for a {diameter_mm:.0f} mm nodule in the open lung fields")
    offset = torch.tensor([c.start for c in crop])
    centre = (candidates[_randint(generator, len(candidates))] + offset).tolist()
    box = tuple(slice(c - r, c + r + 1) for c, r in zip(centre, reach, strict=True))
    offsets = torch.meshgrid(
        *[torch.arange(-r, r + 1.0) * s for r, s in zip(reach, spacing, strict=True)], indexing="ij"
    )
    distance = torch.sqrt(sum(o**2 for o in offsets))
    weight = ((radius - distance) / NODULE_EDGE_MM + 0.5).clamp(0, 1)
    mu[box] += weight * (MU_SOFT_TISSUE - mu[box])


def insert_findings(
    ct: ChestCT,
    findings: Iterable[str],
    generator: torch.Generator,
    *,
    nodule_diameter_mm: tuple[float, float] = (10.0, 25.0),
    effusion_height: tuple[float, float] = (0.25, 0.45),
    heart_scale: tuple[float, float] = (1.25, 1.45),
) -> torch.Tensor:
    """A new attenuation volume of `ct` with `findings` (names from FINDINGS) inserted; `ct` is untouched.

    Applied in the order cardiomegaly, pleural effusion, nodule, each on the lung the previous ones left
    aerated, so that none hides another's defining change (the nodule always lies in the open lung).

    Args:
        ct: the chest CT (`load_chest_ct`); its attenuation is cached and never modified.
        findings: finding names, any order; unknown names raise ValueError.
        generator: source of every random draw: the same seed gives the same volume.
        nodule_diameter_mm: range of the nodule diameter.
        effusion_height: range of the fluid level at the chest wall, as a fraction of the lung's head-feet
            extent above its base. One side or both (one in three), each with its own level.
        heart_scale: range of the heart's in-plane enlargement factor about its centroid.
    """
    wanted = set(findings)
    unknown = wanted - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDINGS}")
    mu = ct.attenuation.clone()
    lungs = {side: _mask(ct, (f"lung_*_{side}",)) for side in SIDES}
    aerated = lungs["right"] | lungs["left"]
    if "cardiomegaly" in wanted:
        aerated &= ~_enlarge_heart(ct, mu, aerated, _uniform(generator, *heart_scale))
    if "pleural_effusion" in wanted:
        choice = _randint(generator, 3)
        for side in SIDES if choice == 2 else (SIDES[choice],):
            aerated &= ~_add_effusion(mu, lungs[side], aerated, side, _uniform(generator, *effusion_height))
    if "nodule" in wanted:
        side = SIDES[_randint(generator, 2)]
        _add_nodule(
            mu, aerated & lungs[side], ct.spacing, _uniform(generator, *nodule_diameter_mm), generator
        )
    return mu


def sample_findings(generator: torch.Generator, prevalence: float = 0.5) -> list[str]:
    """Findings of one case, each present independently with probability `prevalence` (FINDINGS order)."""
    draws = torch.rand(len(FINDINGS), generator=generator)
    return [name for name, draw in zip(FINDINGS, draws.tolist(), strict=True) if draw < prevalence]
