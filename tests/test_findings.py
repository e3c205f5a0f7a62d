"""Inserted findings: a fresh volume, reproducible, changed only where the disease is, and visible on film."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ace_hf.synthetic.ct import ANATOMY_GROUPS, MU_WATER, ChestCT, load_chest_ct
from ace_hf.synthetic.drr import Radiograph, render_drr
from ace_hf.synthetic.findings import (
    FINDINGS,
    MU_SOFT_TISSUE,
    NODULE_EDGE_MM,
    insert_findings,
    sample_findings,
)

SIZE = 64
GROUP = {name: value for value, name in enumerate(ANATOMY_GROUPS, start=1)}


@pytest.fixture(scope="module")
def ct() -> ChestCT:
    return load_chest_ct(downsample=4)


@pytest.fixture(scope="module")
def groups(ct: ChestCT) -> torch.Tensor:
    return ct.group_labels()


@pytest.fixture(scope="module")
def film(ct: ChestCT, groups: torch.Tensor) -> Radiograph:
    return render_drr(ct.attenuation, ct.spacing, size=SIZE, anatomy=groups)


def insert(ct: ChestCT, findings: list[str] | tuple[str, ...], seed: int = 0, **ranges) -> torch.Tensor:
    return insert_findings(ct, findings, torch.Generator().manual_seed(seed), **ranges)


def projected(ct: ChestCT, volume: torch.Tensor, region: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The film of `volume` and the pixels where `region` (a voxel mask) projects."""
    image, anatomy = render_drr(volume, ct.spacing, size=SIZE, anatomy=region.to(torch.uint8))
    return image.astype(np.float64), anatomy == 1


def lung_only(mask: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether every voxel of `mask` is lung."""
    return bool(((groups[mask] == GROUP["lung_right"]) | (groups[mask] == GROUP["lung_left"])).all())


def widest_row(mask: np.ndarray | torch.Tensor) -> int:
    """Largest left-right extent, first to last true element, over the rows of a 2-D mask."""
    return max(int(row.nonzero()[0][-1] - row.nonzero()[0][0]) + 1 for row in np.asarray(mask) if row.any())


def test_sample_findings_follows_the_generator_and_prevalence() -> None:
    def sample(seed: int, prevalence: float = 0.5) -> list[str]:
        return sample_findings(torch.Generator().manual_seed(seed), prevalence)

    assert sample(0, 0.0) == [] and sample(0, 1.0) == list(FINDINGS)
    cases = [sample(seed) for seed in range(200)]
    assert cases[:20] == [sample(seed) for seed in range(20)]
    assert len({tuple(case) for case in cases}) == 2 ** len(FINDINGS)  # independent: every combination
    for name in FINDINGS:
        assert 70 < sum(name in case for case in cases) < 130, name


def test_insert_findings_returns_a_new_reproducible_volume(ct: ChestCT) -> None:
    original = ct.attenuation.clone()
    volume = insert(ct, FINDINGS)
    assert torch.equal(ct.attenuation, original)  # the cached CT is untouched
    assert volume.data_ptr() != ct.attenuation.data_ptr() and volume.shape == original.shape
    assert torch.equal(insert(ct, FINDINGS), volume)
    assert torch.equal(insert(ct, list(reversed(FINDINGS))), volume)  # the order of the names is irrelevant
    assert not torch.equal(insert(ct, FINDINGS, seed=1), volume)
    normal = insert(ct, [])
    assert torch.equal(normal, original) and normal.data_ptr() != ct.attenuation.data_ptr()
    with pytest.raises(ValueError, match="pneumothorax"):
        insert(ct, ["nodule", "pneumothorax"])


@pytest.mark.parametrize("seed", range(3))
def test_nodule_is_a_soft_tissue_sphere_in_one_lung(
    ct: ChestCT, groups: torch.Tensor, film: Radiograph, seed: int
) -> None:
    diameter = 15.0
    volume = insert(ct, ["nodule"], seed, nodule_diameter_mm=(diameter, diameter))
    nodule = volume != ct.attenuation
    sides = [(groups[nodule] == GROUP[side]).all() for side in ("lung_right", "lung_left")]
    assert nodule.any() and any(sides)  # wholly inside one lung
    assert float(volume[nodule].max()) == pytest.approx(MU_SOFT_TISSUE)  # a solid core
    index = nodule.nonzero()
    for axis, spacing in enumerate(ct.spacing):  # extent: the diameter plus the soft edge, to a voxel
        extent = float(index[:, axis].max() - index[:, axis].min() + 1) * spacing
        assert diameter + NODULE_EDGE_MM - spacing < extent <= diameter + NODULE_EDGE_MM + spacing + 1e-6
    image, spot = projected(ct, volume, nodule)
    rise = image - film.image
    assert spot.sum() >= 4 and rise[spot].mean() > 1500  # a round opacity where the nodule projects
    assert spot.flat[rise.argmax()]


def test_pleural_effusion_fills_the_base_of_one_or_both_lungs(
    ct: ChestCT, groups: torch.Tensor, film: Radiograph
) -> None:
    height = 0.4
    seen = set()
    for seed in range(3):  # the right, the left and both sides
        volume = insert(ct, ["pleural_effusion"], seed, effusion_height=(height, height))
        fluid = volume != ct.attenuation
        wet = []
        for side in ("lung_right", "lung_left"):
            lung = groups == GROUP[side]
            if not (fluid & lung).any():
                continue
            wet.append(side)
            si = lung.nonzero()[:, 0]
            top, bottom = int(si.min()), int(si.max())
            side_fluid = (fluid & lung).nonzero()
            # Only the lowest 40 %, the slice the surface crosses partly filled.
            assert int(side_fluid[:, 0].min()) >= bottom - height * (bottom - top) - 0.5
            assert torch.allclose(volume[bottom][lung[bottom]], torch.tensor(MU_WATER))  # the base is water
        assert wet and lung_only(fluid, groups), seed
        seen.add(tuple(wet))
        image, shadow = projected(ct, volume, fluid)
        assert (image - film.image)[shadow].mean() > 3000, seed  # a basal opacity
    assert seen == {("lung_right",), ("lung_left",), ("lung_right", "lung_left")}


def test_cardiomegaly_widens_the_heart_and_its_shadow(
    ct: ChestCT, groups: torch.Tensor, film: Radiograph
) -> None:
    volume = insert(ct, ["cardiomegaly"], heart_scale=(1.35, 1.35))
    grown = volume != ct.attenuation
    heart = groups == GROUP["heart"]
    # New heart replaces lung and unlabelled soft tissue, never bone, vessels or the heart itself.
    lung = (groups == GROUP["lung_right"]) | (groups == GROUP["lung_left"])
    assert grown.any() and (lung | (ct.labels == 0))[grown].all() and not (grown & heart).any()
    assert float(volume[grown].max()) == pytest.approx(MU_SOFT_TISSUE)
    slices = heart.any(2).any(1).nonzero()
    assert set(grown.any(2).any(1).nonzero().flatten().tolist()) <= set(range(slices.min(), slices.max() + 1))
    assert widest_row((heart | grown).any(2)) >= 1.25 * widest_row(heart.any(2))  # RL width on the volume

    image, anatomy = render_drr(
        volume, ct.spacing, size=SIZE, anatomy=torch.where(grown, GROUP["heart"], groups).to(torch.uint8)
    )
    thorax = widest_row(np.isin(film.anatomy, [GROUP["lung_right"], GROUP["lung_left"], GROUP["heart"]]))
    before, after = widest_row(film.anatomy == GROUP["heart"]), widest_row(anatomy == GROUP["heart"])
    assert before / thorax < 0.5 < after / thorax  # the cardiothoracic ratio crosses the usual limit
    new_shadow = (anatomy == GROUP["heart"]) & (film.anatomy != GROUP["heart"])
    assert (image.astype(np.float64) - film.image)[new_shadow].mean() > 3000


def test_findings_do_not_hide_each_other(ct: ChestCT, groups: torch.Tensor) -> None:
    """The nodule is inserted last, into lung that neither the effusion nor the heart took."""
    for seed in range(2):
        others = insert(ct, ["cardiomegaly", "pleural_effusion"], seed)
        nodule = insert(ct, FINDINGS, seed) != others  # same draws up to the nodule's
        assert nodule.any() and lung_only(nodule, groups)
        assert (others[nodule] == ct.attenuation[nodule]).all()  # still aerated lung there
