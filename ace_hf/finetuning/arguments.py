"""Every option of a fine-tuning run, and the refusal of contradictory options and missing paths before any data
or model is read (argparse's usage and one `error:` line, exit code 2).

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..arguments import REPORT_TO_CHOICES, check_model_source, check_report_to, parse_size
from ..presets_ace import IGNORE_INDEX

# The scalar scores each kind of task reports (with the validation loss, "loss"), its default best metric first:
# what --metric_for_best_model may name. All are better when higher, the loss when lower.
TASK_SCORES = {
    "classification": ("balanced_accuracy", "accuracy", "roc_auc"),  # roc_auc with two classes only
    "multi_label": ("roc_auc",),
    "segmentation": ("mean_iou", "mean_accuracy", "overall_accuracy"),
}
# Scores that need exactly two classes.
TWO_CLASS_SCORES = {"classification": ("roc_auc",)}


def score_names(task_kind: str, num_labels: int | None = None) -> tuple[str, ...]:
    """The scalar scores `evaluate` reports for `task_kind` with `num_labels` classes (None: every score it can
    report for some number of classes), the default best metric first."""
    two_class = TWO_CLASS_SCORES.get(task_kind, ())
    scores = TASK_SCORES[task_kind]
    if num_labels is not None and num_labels != 2:
        scores = tuple(name for name in scores if name not in two_class)
    return (*scores, "loss")


@dataclass
class FinetuningArguments:
    """Options of `finetune`; each field is also a command-line flag of the same name."""

    # model
    model_name_or_path: str = field(metadata={"help": "An ACE encoder folder or Hub id."})
    size: str | None = field(
        default=None,
        metadata={
            "help": "Model input size, N or HxW pixels, multiples of the token stride (default: the processor's "
            "own); the fine-tuned model's processor keeps it."
        },
    )
    resize_mode: Literal["resize", "shortest_edge_crop", "pad"] | None = field(
        default=None,
        metadata={
            "help": "How images meet the size: resize stretches, pad and shortest_edge_crop keep the aspect "
            "ratio (default: the processor's own; segmentation needs resize)."
        },
    )
    freeze_encoder: bool = field(default=False, metadata={"help": "Train the head only (linear probing)."})
    # task
    task: Literal["classification", "segmentation"] = field(
        default="classification", metadata={"help": "Image-level classes, or a class per pixel."}
    )
    multi_label: bool = field(
        default=False, metadata={"help": "Several 0/1 labels per image (needs --label_columns)."}
    )
    ignore_index: int = field(
        default=IGNORE_INDEX, metadata={"help": "Mask value left out of loss and mIoU."}
    )
    # data: one of train_dir, dataset_name, train_csv
    train_dir: str | None = field(
        default=None,
        metadata={"help": "An image folder with one subfolder per class (datasets' imagefolder)."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration."}
    )
    train_split_name: str = field(
        default="train", metadata={"help": "Split of --train_dir or --dataset_name."}
    )
    validation_split_name: str = field(
        default="validation", metadata={"help": "Validation split, if the data has one."}
    )
    train_csv: str | None = field(
        default=None, metadata={"help": "A CSV of image paths (relative to the CSV's folder) and labels."}
    )
    validation_csv: str | None = field(
        default=None, metadata={"help": "A CSV like --train_csv's, to validate on."}
    )
    image_column: str = field(default="image", metadata={"help": "Image (file path) column."})
    label_column: str = field(
        default="label", metadata={"help": "Class column of single-label classification."}
    )
    label_columns: str | None = field(
        default=None, metadata={"help": "Comma-separated 0/1 columns of multi-label classification."}
    )
    mask_column: str = field(default="mask", metadata={"help": "Label-map column of segmentation."})
    label_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated segmentation class names (default: class_0 ... from the masks)."},
    )
    validation_fraction: float = field(default=0.2, metadata={"help": "Held out when no validation split."})
    shots_per_class: int | None = field(
        default=None, metadata={"help": "Few-shot: train on K examples per class."}
    )
    train_fraction: float = field(default=1.0, metadata={"help": "Train on this share of the train set."})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Processes decoding batches (0: the main one)."}
    )
    # training
    output_dir: str = field(
        default="outputs/ace-finetune", metadata={"help": "Where the best epoch's model and scores go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the model and checkpoints of another run in --output_dir (refused otherwise)."
        },
    )
    num_train_epochs: int = field(
        default=10, metadata={"help": "Passes over the train set, each one validated."}
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Train this many optimizer steps instead (overrides --num_train_epochs); validated at each "
            "epoch's end and at the last step."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue a run from a checkpoint folder, or 'latest' in --output_dir/checkpoints (one is "
            "saved at each epoch's end)."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers scheduler name."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Steps of linear learning-rate warmup."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Training images per batch and device."}
    )
    per_device_eval_batch_size: int = field(
        default=32, metadata={"help": "Validation images per batch and device."}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Validation metric that picks the saved epoch (the loss is minimized, the others maximized; "
            "the first is the default): "
            + "; ".join(f"{kind.replace('_', '-')} {', '.join(score_names(kind))}" for kind in TASK_SCORES)
            + " (roc_auc of classification with two classes only)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the held-out validation set, the few-shot draw and training."}
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Log the losses and validation scores to tensorboard or wandb (all: every installed one), "
            "in --output_dir.",
            "choices": REPORT_TO_CHOICES,
        },
    )
    # the Hub
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the best model and its card to the Hub."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "The Hub repo to push to (namespace/name)."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(
        default=None,
        metadata={"help": "Hub token (default: $HF_TOKEN, else the token stored by `hf auth login`)."},
    )

    def __post_init__(self) -> None:
        """Refuse contradictory options, then paths that are not there, before any data or model is read."""
        sources = [name for name in ("train_dir", "dataset_name", "train_csv") if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError("pass exactly one of --train_dir, --dataset_name, --train_csv")
        if self.validation_csv and not self.train_csv:
            raise ValueError("--validation_csv goes with --train_csv")
        if self.multi_label and not self.label_columns:
            raise ValueError("--multi_label needs --label_columns a,b,c")
        if self.task == "segmentation" and (self.train_dir or self.multi_label):
            raise ValueError("--task segmentation reads image/mask pairs from --train_csv or --dataset_name")
        if self.shots_per_class is not None and self.task == "segmentation":
            raise ValueError(
                "--shots_per_class needs image-level classes; use --train_fraction for segmentation"
            )
        if self.shots_per_class is not None and (self.shots_per_class < 1 or self.train_fraction != 1.0):
            raise ValueError("--shots_per_class must be >= 1 and excludes --train_fraction")
        if not 0 < self.train_fraction <= 1 or not 0 < self.validation_fraction < 1:
            raise ValueError("--train_fraction must be in (0, 1] and --validation_fraction in (0, 1)")
        if self.num_train_epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("--num_train_epochs and --max_steps must be >= 1")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.size is not None:
            parse_size(self.size)  # a malformed size fails with the arguments; the stride is checked at load
        if self.task == "segmentation" and self.resize_mode not in (None, "resize"):
            raise ValueError(
                f"--task segmentation needs --resize_mode resize: masks are stretched to the input, so images "
                f"fitted by {self.resize_mode} would not line up with them"
            )
        metrics = score_names(self.task_kind)
        if self.metric_for_best_model is not None and self.metric_for_best_model not in metrics:
            kind = self.task_kind.replace("_", "-")
            raise ValueError(
                f"--metric_for_best_model {self.metric_for_best_model!r} is not a {kind} score; choose one of "
                f"{', '.join(metrics)}"
            )
        check_report_to(self.report_to)
        self.check_paths()

    def check_paths(self) -> None:
        """Each local path option names something that is there: a typo costs one line, not a model download
        attempt or a crash halfway through reading the data."""
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        for option, value, is_there, kind in (
            ("--train_dir", self.train_dir, Path.is_dir, "folder"),
            ("--train_csv", self.train_csv, Path.is_file, "file"),
            ("--validation_csv", self.validation_csv, Path.is_file, "file"),
        ):
            if value and not is_there(Path(value)):
                raise ValueError(f"{option} {value}: no such {kind}")
        resume = self.resume_from_checkpoint
        if resume and resume != "latest" and not Path(resume).is_dir():
            raise ValueError(
                f"--resume_from_checkpoint {resume}: no such checkpoint folder (or pass 'latest')"
            )

    @property
    def task_kind(self) -> str:
        """ "classification", "multi_label" or "segmentation": what the metrics, defaults and card depend on."""
        return "multi_label" if self.multi_label else self.task

    @property
    def best_metric(self) -> str:
        """The validation metric that picks the saved epoch."""
        return self.metric_for_best_model or score_names(self.task_kind)[0]
