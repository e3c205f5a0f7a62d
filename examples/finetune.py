"""Fine-tune (or linearly probe) an ACE encoder for image classification or semantic segmentation.

    python examples/finetune.py --model_name_or_path outputs/ace-pretrain --train_dir my_xrays   # class folders
    python examples/finetune.py --model_name_or_path org/ace-vit-b --train_csv train.csv --multi_label \
        --label_columns effusion,nodule --freeze_encoder --learning_rate 1e-3                    # linear probe
    accelerate launch examples/finetune.py --task segmentation --model_name_or_path org/ace-vit-b \
        --train_csv masks.csv --train_fraction 0.1                                                # 10% of labels

Data: an image folder (labels from the folder names; train/ and validation/ subfolders give both splits), a Hub
dataset, or CSV files with image paths relative to the CSV (`image` and `label` columns, 0/1 columns for
multi-label, `image` and `mask` columns for segmentation, masks being integer label PNGs). Without a validation
split, `--validation_fraction` of the train set is held out with `--seed` before any few-shot or fraction
subsampling: for one seed, every point of a label-efficiency curve is scored on the same images (to compare
several few-shot draws, vary `--seed` with a fixed validation split). Each epoch is evaluated with the offline
metric modules of `ace_hf.metrics`; the best epoch's model, image processor and `eval_results.json` are written
to `--output_dir`.

The loop is written out with Accelerate, as in the project's pretraining script and accelerate's
complete_nlp_example.py, rather than hidden in transformers' Trainer, so that encoder freezing, per-epoch
evaluation and best-model selection read top to bottom in one file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
    get_scheduler,
)

import ace_hf  # noqa: F401  (registers the ACE classes with the Auto classes)
from ace_hf.hub import push_to_hub
from ace_hf.image_io import decode_image, example_name
from ace_hf.metrics import load_metric
from ace_hf.optimization import parameter_groups
from ace_hf.sampling import draw

logger = get_logger(__name__)

# Default `--metric_for_best_model` per kind of task; every one of them is better when higher.
DEFAULT_BEST_METRIC = {
    "classification": "balanced_accuracy",
    "multi_label": "roc_auc",
    "segmentation": "mean_iou",
}
PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation"}
TASK_DESCRIPTIONS = {
    "classification": "Single-label classification",
    "multi_label": "Multi-label classification",
    "segmentation": "Semantic segmentation",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    task = parser.add_argument_group("task")
    task.add_argument("--task", choices=("classification", "segmentation"), default="classification")
    task.add_argument(
        "--multi_label", action="store_true", help="Several 0/1 labels per image (needs --label_columns)."
    )
    task.add_argument("--ignore_index", type=int, default=255, help="Mask value left out of loss and mIoU.")
    data = parser.add_argument_group("data (one of --train_dir, --dataset_name, --train_csv)")
    data.add_argument(
        "--train_dir", help="An image folder with one subfolder per class (datasets' imagefolder)."
    )
    data.add_argument("--dataset_name", help="A Hub dataset.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_split_name", default="train")
    data.add_argument("--validation_split_name", default="validation")
    data.add_argument("--train_csv", help="A CSV of image paths (relative to the CSV's folder) and labels.")
    data.add_argument("--validation_csv")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label", help="Class column of single-label classification.")
    data.add_argument("--label_columns", help="Comma-separated 0/1 columns of multi-label classification.")
    data.add_argument("--mask_column", default="mask", help="Label-map column of segmentation.")
    data.add_argument(
        "--label_names",
        help="Comma-separated segmentation class names (default: class_0 ... from the masks).",
    )
    data.add_argument(
        "--validation_fraction", type=float, default=0.2, help="Held out when no validation split."
    )
    data.add_argument("--shots_per_class", type=int, help="Few-shot: train on K examples per class.")
    data.add_argument(
        "--train_fraction", type=float, default=1.0, help="Train on this share of the train set."
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True, help="An ACE encoder folder or Hub id.")
    model.add_argument("--freeze_encoder", action="store_true", help="Train the head only (linear probing).")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/ace-finetune")
    train.add_argument("--num_train_epochs", type=int, default=10)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--lr_scheduler_type", default="cosine", help="Any transformers scheduler name.")
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--per_device_train_batch_size", type=int, default=16)
    train.add_argument("--per_device_eval_batch_size", type=int, default=32)
    train.add_argument(
        "--metric_for_best_model",
        help="Validation metric that picks the saved epoch (default: balanced_accuracy, roc_auc for "
        "multi-label, mean_iou for segmentation; a name ending in 'loss' is minimized).",
    )
    train.add_argument("--seed", type=int, default=0)
    hub = parser.add_argument_group("the Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id")
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--hub_token", default=os.environ.get("HF_TOKEN"))
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory options before any data is read."""
    sources = [name for name in ("train_dir", "dataset_name", "train_csv") if getattr(args, name)]
    if len(sources) != 1:
        parser.error("pass exactly one of --train_dir, --dataset_name, --train_csv")
    if args.validation_csv and not args.train_csv:
        parser.error("--validation_csv goes with --train_csv")
    if args.multi_label and not args.label_columns:
        parser.error("--multi_label needs --label_columns a,b,c")
    if args.task == "segmentation" and (args.train_dir or args.multi_label):
        parser.error("--task segmentation reads image/mask pairs from --train_csv or --dataset_name")
    if args.shots_per_class is not None and args.task == "segmentation":
        parser.error("--shots_per_class needs image-level classes; use --train_fraction for segmentation")
    if args.shots_per_class is not None and (args.shots_per_class < 1 or args.train_fraction != 1.0):
        parser.error("--shots_per_class must be >= 1 and excludes --train_fraction")
    if not 0 < args.train_fraction <= 1 or not 0 < args.validation_fraction < 1:
        parser.error("--train_fraction must be in (0, 1] and --validation_fraction in (0, 1)")
    if args.num_train_epochs < 1:
        parser.error("--num_train_epochs must be >= 1")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")


def task_kind(args: argparse.Namespace) -> str:
    return "multi_label" if args.multi_label else args.task


# ----------------------------------------------------------------------------------------------------------------
# Data: every source becomes a datasets.Dataset with an undecoded `image` and `labels` (or `mask`) column
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list[str]
    skipped: list[str]


def require_columns(available: list[str], needed: list[str], source: str) -> None:
    missing = [column for column in needed if column not in available]
    if missing:
        raise ValueError(
            f"{source} has no column(s) {', '.join(map(repr, missing))}; its columns: {available}"
        )


def source_columns(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(file columns, label columns) that the task reads from the data source."""
    if args.task == "segmentation":
        return [args.image_column, args.mask_column], []
    labels = args.label_columns.split(",") if args.multi_label else [args.label_column]
    return [args.image_column], labels


def read_csv(path: str, args: argparse.Namespace) -> datasets.Dataset:
    """A CSV's needed columns; its file paths resolved against the CSV's folder and checked to exist."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file {path!r} not found")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    file_columns, label_columns = source_columns(args)
    require_columns(list(reader.fieldnames or []), file_columns + label_columns, f"CSV {path!r}")
    if not rows:
        raise ValueError(f"CSV {path!r} has no rows")
    for column in file_columns:
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            row[column] = str(csv_path.parent / row[column])  # an absolute path stays as it is
            if not Path(row[column]).is_file():
                raise FileNotFoundError(
                    f"CSV {path!r}, line {line}, column {column!r}: file {row[column]!r} does not exist"
                )
    return datasets.Dataset.from_list([{c: row[c] for c in file_columns + label_columns} for row in rows])


def load_splits(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The raw train split and the validation split if the source has one, image columns undecoded."""
    if args.train_csv:
        train = read_csv(args.train_csv, args)
        validation = read_csv(args.validation_csv, args) if args.validation_csv else None
    else:
        if args.train_dir:
            if not Path(args.train_dir).is_dir():
                raise ValueError(f"--train_dir {args.train_dir!r} is not a directory")
            splits = datasets.load_dataset("imagefolder", data_dir=args.train_dir)
        else:
            splits = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        if args.train_split_name not in splits:
            raise ValueError(f"No split {args.train_split_name!r} in the data; splits: {list(splits)}")
        train, validation = splits[args.train_split_name], splits.get(args.validation_split_name)
    file_columns, label_columns = source_columns(args)
    for name, split in (("train", train), ("validation", validation)):
        if split is not None:
            require_columns(split.column_names, file_columns + label_columns, f"The {name} split")
    train = undecoded(train, file_columns)
    return train, None if validation is None else undecoded(validation, file_columns)


def undecoded(dataset: datasets.Dataset, columns: list[str]) -> datasets.Dataset:
    """Leave image files undecoded until a batch needs them, where `decode_image` reads any format."""
    for column in columns:
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def class_names(args: argparse.Namespace, splits: list[datasets.Dataset]) -> list[str]:
    """Classification label names: the ClassLabel names, the --label_columns, or the sorted label values."""
    if args.multi_label:
        return args.label_columns.split(",")
    feature = splits[0].features[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return sorted({str(value) for split in splits for value in split[args.label_column]})


def encode_labels(dataset: datasets.Dataset, args: argparse.Namespace, names: list[str]) -> datasets.Dataset:
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
                raise ValueError(
                    f"Multi-label column {column!r} holds {example[column]!r}; it must be 0 or 1"
                )
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
    dataset: datasets.Dataset, processor: Any, split: str
) -> tuple[datasets.Dataset, list[str]]:
    """Decode every image (and mask) once, so that a corrupt file is dropped here, named, instead of crashing
    a batch mid-epoch, and few-shot draws only pick usable examples."""
    keep, skipped = [], []
    for index, example in enumerate(tqdm(dataset, desc=f"Checking {split} images", leave=False)):
        column = "image"
        try:
            processor.to_unit_float(decode_image(example["image"]))
            if "mask" in example:
                column = "mask"
                label_map(example["mask"])
            keep.append(index)
        except Exception as error:  # any unreadable file (PIL, pydicom, windowing) is skipped, not fatal
            skipped.append(f"{example_name(example[column], index)} ({type(error).__name__}: {error})")
    if not keep:
        raise ValueError(f"No readable example in the {split} split; first problem: {skipped[0]}")
    return dataset.select(keep), skipped


def segmentation_names(args: argparse.Namespace, splits: list[datasets.Dataset]) -> list[str]:
    """--label_names, or class_0 ... class_N for the largest label found in the masks (ignore_index aside)."""
    if args.label_names:
        return args.label_names.split(",")
    logger.info("Scanning the masks for the number of classes (pass --label_names to skip this).")
    largest = 0
    for split in splits:
        for value in tqdm(split["mask"], desc="Scanning masks", leave=False):
            labels = np.unique(label_map(value))
            largest = max(largest, int(labels[labels != args.ignore_index].max(initial=0)))
    return [f"class_{index}" for index in range(largest + 1)]


def hold_out_validation(
    train: datasets.Dataset, args: argparse.Namespace
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Carve --validation_fraction off the train set with --seed (stratified for single-label classes)."""
    stratify = "labels" if task_kind(args) == "classification" else None
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
            raise ValueError(
                f"--shots_per_class {k}: class {name!r} has only {len(candidates)} training example(s) left"
            )
        chosen += [int(candidates[i]) for i in draw(len(candidates), k, generator)]
    return sorted(chosen)


def subsample(train: datasets.Dataset, args: argparse.Namespace, names: list[str]) -> datasets.Dataset:
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


def prepare_data(args: argparse.Namespace, processor: Any) -> TaskData:
    """Load, label, check, split and subsample the data, in an order that keeps validation fixed."""
    if args.task == "segmentation" and getattr(processor, "resize_mode", "resize") != "resize":
        raise ValueError(
            f"Segmentation masks are resized by plain stretching, but the image processor's resize_mode is "
            f"{processor.resize_mode!r}: images and masks would not line up. Save the processor with "
            "resize_mode='resize' for segmentation."
        )
    train, validation = load_splits(args)
    raw_splits = [split for split in (train, validation) if split is not None]
    names = class_names(args, raw_splits) if args.task == "classification" else []
    train, skipped = drop_unreadable(encode_labels(train, args, names), processor, "train")
    if validation is None:
        logger.info(f"No validation split: holding out {args.validation_fraction:.0%} of the train set.")
        train, validation = hold_out_validation(train, args)
    else:
        validation, skipped_validation = drop_unreadable(
            encode_labels(validation, args, names), processor, "validation"
        )
        skipped += skipped_validation
    if args.task == "segmentation":
        names = segmentation_names(args, [train, validation])
    return TaskData(subsample(train, args, names), validation, names, skipped)


def label_counts(data: TaskData) -> dict[str, int]:
    """Training examples per class (positives per label for multi-label), for logs and eval_results.json."""
    counts = one_hot_labels(data.train, len(data.label_names)).sum(0)
    return {name: int(count) for name, count in zip(data.label_names, counts, strict=True)}


# ----------------------------------------------------------------------------------------------------------------
# Batches and model
# ----------------------------------------------------------------------------------------------------------------


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


def build_model(args: argparse.Namespace, names: list[str]) -> PreTrainedModel:
    """The encoder with a new task head sized and labelled for this data."""
    head = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }
    if args.task == "segmentation":
        return AutoModelForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, semantic_loss_ignore_index=args.ignore_index, **head
        )
    problem_type = "multi_label_classification" if args.multi_label else "single_label_classification"
    return AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, problem_type=problem_type, **head
    )


def set_train_mode(model: torch.nn.Module, frozen: torch.nn.Module | None) -> None:
    """Train mode, with a frozen encoder kept in eval mode (no dropout or drop-path: a fixed feature map)."""
    model.train()
    if frozen is not None:
        frozen.eval()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    segmentation: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits (label maps for segmentation), references and mean loss over the whole validation set."""
    model.eval()
    outputs, references, losses = [], [], []
    for batch in tqdm(
        dataloader, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process
    ):
        result = model(**batch)
        predictions = result.logits.argmax(1) if segmentation else result.logits.float()
        loss = result.loss.detach().float().repeat(len(batch["labels"]))
        predictions, labels, loss = accelerator.gather_for_metrics((predictions, batch["labels"], loss))
        outputs.append(predictions.cpu())
        references.append(labels.cpu())
        losses.append(loss.cpu())
    return torch.cat(outputs), torch.cat(references), float(torch.cat(losses).mean())


def roc_auc(scores: torch.Tensor, references: torch.Tensor, config_name: str) -> dict[str, Any]:
    """ROC-AUC, or NaN with a warning when a label has a single class in the validation set."""
    try:
        return load_metric("roc_auc", config_name=config_name).compute(
            prediction_scores=scores.tolist(), references=references.int().tolist()
        )
    except ValueError as error:
        logger.warning(f"ROC-AUC is undefined on this validation set: {error}")
        return {"roc_auc": math.nan}


def classification_metrics(
    logits: torch.Tensor, references: torch.Tensor, names: list[str]
) -> dict[str, Any]:
    """Accuracy and balanced accuracy; ROC-AUC of the second class too when there are two."""
    predictions = logits.argmax(-1)
    metrics = {
        **load_metric("accuracy").compute(predictions=predictions, references=references),
        **load_metric("balanced_accuracy").compute(predictions=predictions, references=references),
    }
    if len(names) == 2:
        metrics |= roc_auc(logits.softmax(-1)[:, 1], references, "binary")
    return metrics


def multi_label_metrics(logits: torch.Tensor, references: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Macro ROC-AUC over the labels, and each label's."""
    scores = roc_auc(logits.sigmoid(), references, "multilabel")
    per_label = scores.pop("per_label_roc_auc", [math.nan] * len(names))
    return scores | {"per_label_roc_auc": dict(zip(names, per_label, strict=True))}


def segmentation_metrics(
    predictions: torch.Tensor, references: torch.Tensor, names: list[str], ignore_index: int
) -> dict[str, Any]:
    """Mean IoU (and pixel accuracies) at the model's input resolution, where the masks were resized."""
    scores = load_metric("mean_iou").compute(
        predictions=predictions.numpy(),
        references=references.numpy(),
        num_labels=len(names),
        ignore_index=ignore_index,
    )
    per_category = {name: float(iou) for name, iou in zip(names, scores.pop("per_category_iou"), strict=True)}
    scores.pop("per_category_accuracy")
    return {key: float(value) for key, value in scores.items()} | {"per_category_iou": per_category}


def evaluate(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    args: argparse.Namespace,
    names: list[str],
) -> dict[str, Any]:
    outputs, references, loss = predict(model, dataloader, accelerator, args.task == "segmentation")
    if args.task == "segmentation":
        metrics = segmentation_metrics(outputs, references, names, args.ignore_index)
    elif args.multi_label:
        metrics = multi_label_metrics(outputs, references, names)
    else:
        metrics = classification_metrics(outputs, references, names)
    return {"loss": loss, **metrics}


def improved(metrics: dict[str, Any], best: dict[str, Any], metric: str) -> bool:
    """Is this epoch better than the best so far (empty: none yet)? A tie goes to the lower validation loss
    (accuracies saturate on small validation sets); NaN is never better than a number."""
    if not best:
        return True

    def rank(results: dict[str, Any]) -> tuple[bool, float, float]:
        value = results[metric] * (-1 if metric.endswith("loss") else 1)
        return not math.isnan(value), 0.0 if math.isnan(value) else value, -results["loss"]

    return rank(metrics) > rank(best)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The scalar metrics on one log line."""
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, so eval_results.json is strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Saving and publishing
# ----------------------------------------------------------------------------------------------------------------


def save_best(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor: Any,
    output_dir: Path,
    results: dict[str, Any],
) -> None:
    """Overwrite --output_dir with this epoch's model, processor and results."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(json_safe(results), indent=2))


def write_model_card(output_dir: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """A short README.md: what was fine-tuned from what, on what, and the best validation scores."""
    base_model = None if Path(args.model_name_or_path).exists() else args.model_name_or_path
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[args.task],
        base_model=base_model,
        datasets=[args.dataset_name] if args.dataset_name else None,
        tags=["ace", "medical-imaging"],
    )
    how = (
        "a linear head on the frozen ACE encoder"
        if args.freeze_encoder
        else "the ACE encoder fine-tuned end to end"
    )
    rows = "\n".join(
        f"| {name} | {value:.4f} |" for name, value in results.items() if isinstance(value, float)
    )
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {args.hub_model_id or output_dir.name}\n\n"
        f"{TASK_DESCRIPTIONS[task_kind(args)]} with {how} (`{args.model_name_or_path}`), trained with "
        f"ace-hf's `examples/finetune.py` on {results['train_samples']} images.\n\n"
        f"Best validation epoch {results['epoch']} ({results['eval_samples']} images):\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )
    ModelCard(content).save(output_dir / "README.md")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def make_dataloaders(
    data: TaskData, collator: Collator, args: argparse.Namespace
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Shuffled training batches (order fixed by --seed) and in-order validation batches."""
    train = torch.utils.data.DataLoader(
        data.train,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    validation = torch.utils.data.DataLoader(
        data.validation,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )
    return train, validation


def train_epoch(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    progress: tqdm,
) -> float:
    """One pass over the training batches; returns the mean training loss (over batches and processes)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in dataloader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()  # summed on the device: no GPU sync per step
        progress.update(1)
    return accelerator.reduce(loss_sum, "mean").item() / len(dataloader)


def publish(output_dir: Path, args: argparse.Namespace, best: dict[str, Any]) -> None:
    """Write the model card and, with --push_to_hub, upload the folder's files as one commit."""
    write_model_card(output_dir, args, best)
    if args.push_to_hub:
        url = push_to_hub(
            output_dir,
            args.hub_model_id,
            private=args.hub_private_repo,
            token=args.hub_token,
            commit_message=f"Upload ACE {args.task} model fine-tuned from {args.model_name_or_path}",
        )
        logger.info(f"Pushed {output_dir} to {url}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    logger.info(accelerator.state, main_process_only=False)

    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    with accelerator.main_process_first():
        data = prepare_data(args, processor)
    for name in data.skipped:
        logger.warning(f"Skipped unreadable file {name}")
    counts = label_counts(data) if args.task == "classification" else {}
    logger.info(
        f"{len(data.train)} training and {len(data.validation)} validation examples, "
        f"{len(data.label_names)} labels {counts or data.label_names}, {len(data.skipped)} unreadable skipped."
    )

    model = build_model(args, data.label_names)
    frozen = model.base_model.requires_grad_(False) if args.freeze_encoder else None
    train_dataloader, eval_dataloader = make_dataloaders(data, Collator(processor), args)
    optimizer = torch.optim.AdamW(
        parameter_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    total_steps = args.num_train_epochs * len(train_dataloader)  # per process, after sharding
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)

    metric = args.metric_for_best_model or DEFAULT_BEST_METRIC[task_kind(args)]
    facts = {
        "train_samples": len(data.train),
        "eval_samples": len(data.validation),
        "skipped_images": len(data.skipped),
        "metric_for_best_model": metric,
    } | ({"train_samples_per_class": counts} if counts else {})
    best: dict[str, Any] = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=total_steps, desc="Training", disable=not accelerator.is_local_main_process)
    for epoch in range(1, args.num_train_epochs + 1):
        set_train_mode(model, frozen)
        train_loss = train_epoch(model, train_dataloader, optimizer, scheduler, accelerator, progress)
        metrics = evaluate(model, eval_dataloader, accelerator, args, data.label_names)
        if metric not in metrics:
            raise ValueError(
                f"--metric_for_best_model {metric!r} is not computed; choose one of {list(metrics)}"
            )
        logger.info(f"epoch {epoch}: train loss {train_loss:.4f}; validation {format_metrics(metrics)}")
        if improved(metrics, best, metric):
            best = {"epoch": epoch, **metrics, **facts}
            save_best(accelerator, model, processor, output_dir, best)
            logger.info(f"Best {metric} so far ({metrics[metric]:.4f}): saved epoch {epoch} to {output_dir}")
    progress.close()

    if data.skipped:
        logger.warning(
            f"{len(data.skipped)} unreadable file(s) were skipped; their names are in the warnings above."
        )
    if accelerator.is_main_process:
        publish(output_dir, args, best)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return best


if __name__ == "__main__":
    main()
