"""Fine-tuning data: every source (CSV, image folder, Hub dataset) becomes a `datasets.Dataset` with an undecoded
`image` and a `labels` (or `mask`) column, checked, split and subsampled in an order that keeps validation
fixed; `Collator` turns examples into model batches with the encoder's image processor (`load_processor`).

A mistake in the data (a missing file or column, a label out of range, too few examples) is a `DataError`,
raised before the model loads: `ace-hf finetune` shows it as one `error:` line.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from datasets.data_files import EmptyDatasetError
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
from tqdm.auto import tqdm
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor

from ..arguments import check_size, parse_size, read_model_config
from ..image_io import decode_image, example_name, load_or_skip
from ..sampling import draw
from .arguments import FinetuningArguments

logger = get_logger(__name__)


class DataError(ValueError):
    """The data cannot train this task as asked (a missing file or column, a label out of range, too few
    examples of a class): the user's to fix, so the command shows one line rather than a traceback."""


@dataclass
class TaskData:
    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list[str]
    skipped: list[str]


def load_processor(args: FinetuningArguments) -> BaseImageProcessor:
    """The encoder's image processor, at --size / --resize_mode when given (the fine-tuned model's processor
    keeps them). Checked before the model loads: the size against the token stride (SizeError), the model
    folder or Hub id (ModelSourceError), and for segmentation a resize mode that keeps masks aligned."""
    config = read_model_config(args.model_name_or_path, "--model_name_or_path")
    overrides: dict[str, Any] = {"resize_mode": args.resize_mode} if args.resize_mode else {}
    if args.size is not None:
        overrides["size"] = parse_size(args.size)
        check_size(overrides["size"], config.token_stride)
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **overrides)
    if args.task == "segmentation" and getattr(processor, "resize_mode", "resize") != "resize":
        raise DataError(
            f"Segmentation masks are resized by plain stretching, but the image processor's resize_mode is "
            f"{processor.resize_mode!r}: images and masks would not line up. Pass --resize_mode resize."
        )
    return processor


def require_columns(available: list[str], needed: list[str], source: str) -> None:
    missing = [column for column in needed if column not in available]
    if missing:
        raise DataError(
            f"{source} has no column(s) {', '.join(map(repr, missing))}; its columns: {available}"
        )


def source_columns(args: FinetuningArguments) -> tuple[list[str], list[str]]:
    """(file columns, label columns) that the task reads from the data source."""
    if args.task == "segmentation":
        return [args.image_column, args.mask_column], []
    labels = args.label_columns.split(",") if args.multi_label else [args.label_column]
    return [args.image_column], labels


def read_csv(path: str, option: str, args: FinetuningArguments) -> datasets.Dataset:
    """The needed columns of the CSV `option` names; its file paths resolved against the CSV's folder and
    checked to exist."""
    csv_path = Path(path)
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    file_columns, label_columns = source_columns(args)
    require_columns(list(reader.fieldnames or []), file_columns + label_columns, f"{option} {path}")
    if not rows:
        raise DataError(f"{option} {path} has no rows")
    for column in file_columns:
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            row[column] = str(csv_path.parent / row[column])  # an absolute path stays as it is
            if not Path(row[column]).is_file():
                raise DataError(
                    f"{option} {path}, line {line}, column {column!r}: file {row[column]!r} does not exist"
                )
    return datasets.Dataset.from_list([{c: row[c] for c in file_columns + label_columns} for row in rows])


def load_splits(args: FinetuningArguments) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The raw train split and the validation split if the source has one, image columns undecoded."""
    if args.train_csv:
        train = read_csv(args.train_csv, "--train_csv", args)
        validation = read_csv(args.validation_csv, "--validation_csv", args) if args.validation_csv else None
    else:
        splits = load_folder_or_hub_dataset(args)
        if args.train_split_name not in splits:
            raise DataError(f"No split {args.train_split_name!r} in the data; splits: {list(splits)}")
        train, validation = splits[args.train_split_name], splits.get(args.validation_split_name)
    file_columns, label_columns = source_columns(args)
    for name, split in (("train", train), ("validation", validation)):
        if split is not None:
            require_columns(split.column_names, file_columns + label_columns, f"The {name} split")
    train = undecoded(train, file_columns)
    return train, None if validation is None else undecoded(validation, file_columns)


def load_folder_or_hub_dataset(args: FinetuningArguments) -> datasets.DatasetDict:
    """--train_dir as an imagefolder, or the Hub dataset --dataset_name; DataError naming the option when it
    holds no images or does not exist."""
    option, value = (
        ("--train_dir", args.train_dir) if args.train_dir else ("--dataset_name", args.dataset_name)
    )
    try:
        if args.train_dir:
            return datasets.load_dataset("imagefolder", data_dir=args.train_dir)
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except (DatasetNotFoundError, DataFilesNotFoundError, EmptyDatasetError) as error:
        raise DataError(f"{option} {value}: {error}") from None


def undecoded(dataset: datasets.Dataset, columns: list[str]) -> datasets.Dataset:
    """Leave image files undecoded until a batch needs them, where `decode_image` reads any format."""
    for column in columns:
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def class_names(args: FinetuningArguments, splits: list[datasets.Dataset]) -> list[str]:
    """Classification label names: the ClassLabel names, the --label_columns, or the sorted label values."""
    if args.multi_label:
        return args.label_columns.split(",")
    feature = splits[0].features[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return sorted({str(value) for split in splits for value in split[args.label_column]})


def encode_labels(dataset: datasets.Dataset, args: FinetuningArguments, names: list[str]) -> datasets.Dataset:
    """Columns `image` and `labels` (a class index, or a 0/1 float vector) or `image` and `mask`."""
    if args.task == "segmentation":
        return rename(dataset, {args.image_column: "image", args.mask_column: "mask"})
    if args.multi_label:
        encode = multi_label_encoder(names)
    else:
        index = {name: i for i, name in enumerate(names)}
        feature = dataset.features[args.label_column]
        as_name = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
        encode = lambda example: {"labels": index[as_name(example[args.label_column])]}  # noqa: E731
    dataset = dataset.map(encode, desc="Encoding labels")
    if not args.multi_label:  # a ClassLabel column lets hold_out_validation stratify
        dataset = dataset.cast_column("labels", datasets.ClassLabel(names=names))
    return rename(dataset, {args.image_column: "image"}, extra=["labels"])


def multi_label_encoder(columns: list[str]) -> Callable[[dict[str, Any]], dict[str, list[float]]]:
    """Example -> {"labels": [0/1 floats]}, refusing anything but 0/1 in a label column."""

    def encode(example: dict[str, Any]) -> dict[str, list[float]]:
        values = []
        for column in columns:
            try:
                value = float(example[column])
            except (TypeError, ValueError):  # an empty cell or a word
                value = math.nan
            if value not in (0.0, 1.0):
                raise DataError(f"Multi-label column {column!r} holds {example[column]!r}; it must be 0 or 1")
            values.append(value)
        return {"labels": values}

    return encode


def rename(dataset: datasets.Dataset, names: dict[str, str], extra: list[str] = ()) -> datasets.Dataset:
    dataset = dataset.select_columns([*names, *extra])
    return dataset.rename_columns({old: new for old, new in names.items() if old != new})


def label_map(value: Any) -> np.ndarray:
    """A segmentation mask as a [H, W] int64 array of class indices."""
    mask = np.asarray(decode_image(value))
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a single-channel label image, got shape {mask.shape}")
    return mask.astype(np.int64)


def drop_unreadable(
    dataset: datasets.Dataset, processor: Any, split: str, ignore_index: int
) -> tuple[datasets.Dataset, list[str], tuple[int, str]]:
    """Decode every image (and mask) once, so that a corrupt file is dropped here, named, instead of crashing
    a batch mid-epoch, and few-shot draws only pick usable examples. Also returns the largest class value of
    the masks (ignore_index aside) and a mask holding it, (-1, "") without masks: what the class names are
    checked against."""

    def windowed(value: Any) -> torch.Tensor:
        return processor.to_unit_float(decode_image(value))

    keep, skipped, largest = [], [], (-1, "")
    for index, example in enumerate(tqdm(dataset, desc=f"Checking {split} images", leave=False)):
        _, problem = load_or_skip(example["image"], index, windowed)
        if problem is None and "mask" in example:
            mask, problem = load_or_skip(example["mask"], index, label_map)
            if problem is None:
                largest = max(
                    largest, largest_class(mask, example_name(example["mask"], index), ignore_index)
                )
        if problem is None:
            keep.append(index)
        else:
            skipped.append(problem)
    if not keep:
        raise DataError(f"No readable example in the {split} split; first problem: {skipped[0]}")
    return dataset.select(keep), skipped, largest


def largest_class(mask: np.ndarray, name: str, ignore_index: int) -> tuple[int, str]:
    """(the largest class value in `mask`, ignore_index aside, or -1; `name`); DataError for a negative one."""
    labels = np.unique(mask)
    labels = labels[labels != ignore_index]
    if labels.size and labels[0] < 0:
        raise DataError(
            f"Mask {name} holds the value {labels[0]}: class values start at 0 (--ignore_index "
            f"{ignore_index} marks the pixels to leave out)"
        )
    return int(labels.max(initial=-1)), name


def segmentation_names(args: FinetuningArguments, largest: tuple[int, str]) -> list[str]:
    """--label_names, or class_0 ... class_N for the largest class value of the masks; DataError when a mask
    holds a value --label_names has no name for (the loss would index past the head's classes)."""
    value, mask = largest
    if not args.label_names:
        return [f"class_{index}" for index in range(max(value, 0) + 1)]
    names = args.label_names.split(",")
    if value >= len(names):
        raise DataError(
            f"Mask {mask} holds the class value {value}, but --label_names names {len(names)} classes (values 0 "
            f"to {len(names) - 1}; --ignore_index {args.ignore_index} marks the pixels to leave out)"
        )
    return names


def hold_out_validation(
    train: datasets.Dataset, args: FinetuningArguments
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Carve --validation_fraction off the train set with --seed (stratified for single-label classes)."""
    stratify = "labels" if args.task_kind == "classification" else None
    split = train.train_test_split(
        test_size=args.validation_fraction, seed=args.seed, stratify_by_column=stratify
    )
    return split["train"], split["test"]


def one_hot_labels(dataset: datasets.Dataset, num_labels: int) -> np.ndarray:
    """[N, num_labels] 0/1 matrix of single- or multi-label targets."""
    labels = np.asarray(dataset["labels"])
    return labels if labels.ndim == 2 else np.eye(num_labels)[labels]


def few_shot_indices(labels: np.ndarray, names: list[str], k: int, generator: torch.Generator) -> list[int]:
    """k examples of each class (multi-label: k more positives of each label), drawn with `generator`."""
    chosen: list[int] = []
    for column, name in enumerate(names):
        candidates = [i for i in np.flatnonzero(labels[:, column]) if i not in chosen]
        if len(candidates) < k:
            raise DataError(
                f"--shots_per_class {k}: class {name!r} has only {len(candidates)} training example(s) left"
            )
        chosen += [int(candidates[i]) for i in draw(len(candidates), k, generator)]
    return sorted(chosen)


def subsample(train: datasets.Dataset, args: FinetuningArguments, names: list[str]) -> datasets.Dataset:
    """The label-efficiency subset: K shots per class or a --train_fraction of the train set."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.shots_per_class:
        return train.select(
            few_shot_indices(one_hot_labels(train, len(names)), names, args.shots_per_class, generator)
        )
    if args.train_fraction < 1:
        count = max(1, round(args.train_fraction * len(train)))
        return train.select(sorted(draw(len(train), count, generator).tolist()))
    return train


def prepare_data(args: FinetuningArguments, processor: Any) -> TaskData:
    """Load, label, check, split and subsample the data, in an order that keeps validation fixed."""
    train, validation = load_splits(args)
    raw_splits = [split for split in (train, validation) if split is not None]
    names = class_names(args, raw_splits) if args.task == "classification" else []
    train, skipped, largest = drop_unreadable(
        encode_labels(train, args, names), processor, "train", args.ignore_index
    )
    if validation is None:
        logger.info(f"No validation split: holding out {args.validation_fraction:.0%} of the train set.")
        train, validation = hold_out_validation(train, args)
    else:
        validation, skipped_validation, largest_validation = drop_unreadable(
            encode_labels(validation, args, names), processor, "validation", args.ignore_index
        )
        skipped += skipped_validation
        largest = max(largest, largest_validation)
    if args.task == "segmentation":
        names = segmentation_names(args, largest)
    return TaskData(subsample(train, args, names), validation, names, skipped)


def label_counts(data: TaskData) -> dict[str, int]:
    """Training examples per class (positives per label for multi-label), for logs and eval_results.json."""
    counts = one_hot_labels(data.train, len(data.label_names)).sum(0)
    return {name: int(count) for name, count in zip(data.label_names, counts, strict=True)}


@dataclass
class Collator:
    """Decode a batch and run it through the model's image processor; masks follow with nearest resizing."""

    processor: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [decode_image(example["image"]) for example in examples]
        pixel_values = self.processor(images, return_tensors="pt")["pixel_values"]
        if "mask" in examples[0]:
            labels = torch.stack(
                [resize_mask(label_map(e["mask"]), pixel_values.shape[-2:]) for e in examples]
            )
        else:
            labels = torch.tensor([example["labels"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}


def resize_mask(mask: np.ndarray, size: torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize on pixel centres, matching how the processor maps image pixels."""
    resized = F.interpolate(
        torch.from_numpy(mask)[None, None].float(), size=tuple(size), mode="nearest-exact"
    )
    return resized[0, 0].long()
