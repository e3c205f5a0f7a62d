"""The arguments of a pretraining run, as one dataclass: from Python, the command line or a JSON/YAML file.

The recipe's optimization fields default to None, meaning "the preset's" (`ace_hf.pretraining.recipe`): the
numbers themselves live there, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..arguments import (
    REPORT_TO_CHOICES,
    check_model_source,
    check_report_to,
    option_field,
    read_model_config,
)
from ..presets_ace import ACE_PRESETS


@dataclass
class PretrainingArguments:
    """What to pretrain on, which encoder, how long, and where the run and its export go."""

    # Data
    dataset_name: str | None = option_field("A Hub dataset (default: the built-in chest DRRs).")
    dataset_config_name: str | None = option_field("The Hub dataset's configuration.")
    dataset_split: str = option_field("The split to train on.", "train")
    train_dir: str | None = option_field(
        "A folder of images (PNG, JPEG, TIFF; DICOM with the [dicom] extra)."
    )
    image_column: str = option_field("The dataset's image column.", "image")
    streaming: bool = option_field("Stream the dataset (needs --max_steps).", False)
    shuffle_buffer_size: int = option_field("Shuffle buffer of a stream.", 1000)
    default_num_images: int = option_field("Size of the built-in DRR set.", 300)
    dataloader_num_workers: int = option_field("Data-loader worker processes.", 0)
    views_on_device: bool | None = option_field(
        "Cut, augment and normalize the views on the training device; the data-loader workers only decode, "
        "window and crop the images and draw the random view parameters (default: on when the device is CUDA; "
        "--no-views_on_device keeps everything on the workers)."
    )
    # Model
    model_preset: str = option_field(
        "The architecture and the recipe's defaults.", "ace-vit-tiny", choices=sorted(ACE_PRESETS)
    )
    config_name: str | None = option_field("A config.json (or folder) overriding the preset's architecture.")
    config_overrides: str | None = option_field(
        "Config fields to override, e.g. 'local_loss_weight=0,dino_out_dim=1024' (ablations, recipes)."
    )
    model_name_or_path: str | None = option_field(
        "Continue from a pretrained ACE encoder (folder or Hub id)."
    )
    init_from_timm: str | None = option_field(
        "Start student and teacher encoders from timm ImageNet weights: a timm model name (downloads) or a "
        "local .safetensors/.pth/.bin file or folder, as the official recipe does."
    )
    gradient_checkpointing: bool = option_field(
        "Recompute activations in the backward pass (less memory).", False
    )
    augmentation_overrides: str | None = option_field(
        "Image processor augmentation fields to override, ranges as low:high, e.g. "
        "'brightness=0.2,contrast=0.2,sharpness=1.2:1.5' (the official code's albumentations defaults)."
    )
    # Recipe (None: the preset's, see ace_hf.pretraining.recipe)
    learning_rate: float | None = option_field(
        "Base learning rate for a global batch of 256 (default: the preset's)."
    )
    min_learning_rate: float | None = option_field(
        "Learning rate at the end of the cosine (default: the preset's)."
    )
    weight_decay: float | None = option_field("Weight decay at the start (default: the preset's).")
    weight_decay_end: float | None = option_field("Weight decay at the end (default: the preset's).")
    warmup_epochs: float | None = option_field(
        "Linear learning-rate warm-up, in epochs (default: the preset's)."
    )
    num_train_epochs: int | None = option_field("Epochs to train (default: the preset's).")
    max_grad_norm: float | None = option_field(
        "Clip the global gradient norm (default: the preset's; DINO's code clips each tensor, the global norm "
        "works with fp16 scaling, FSDP and DeepSpeed)."
    )
    freeze_last_layer_epochs: float | None = option_field(
        "Epochs during which the global head's last layer is frozen (default: the preset's)."
    )
    # Loop
    output_dir: str = option_field("Where checkpoints and the exported encoder go.", "outputs/ace-pretrain")
    per_device_train_batch_size: int = option_field("Images per process and step.", 16)
    gradient_accumulation_steps: int = option_field("Micro-batches per optimizer step.", 1)
    max_steps: int | None = option_field("Optimizer steps; overrides --num_train_epochs.")
    seed: int = option_field("Seed of the weights, the data order and every view.", 0)
    # Checkpoints, logging and the Hub
    checkpointing_steps: int = option_field("Save state every N steps (0: at the end).", 0)
    checkpoints_total_limit: int = option_field("Checkpoints kept (the newest).", 2)
    export_with_checkpoints: bool = option_field("Also export the encoder with each checkpoint.", False)
    resume_from_checkpoint: str | None = option_field("A checkpoint folder, or 'latest' in --output_dir.")
    allow_run_changes: str = option_field(
        "Fields that may differ from the resumed checkpoint's run (e.g. 'learning_rate,total_steps', or "
        "'all'); they are recorded in the training summary and the model card.",
        "",
    )
    overwrite_output_dir: bool = option_field(
        "Replace the export and checkpoints of another run in --output_dir (refused otherwise).", False
    )
    logging_steps: int = option_field("Log the losses every N steps.", 10)
    report_to: str = option_field(
        "Log the losses to tensorboard (under --output_dir) or wandb; all: every one installed.",
        "none",
        choices=REPORT_TO_CHOICES,
    )
    push_to_hub: bool = option_field("Upload the export to --hub_model_id when done.", False)
    hub_model_id: str | None = option_field("The Hub repository to push to (user/name).")
    hub_private_repo: bool = option_field("Create the Hub repository as private.", False)
    hub_token: str | None = option_field("A Hub token (default: $HF_TOKEN or the cached login).")
    save_sample_ids: bool = option_field("Write the example ids each process trained on.", False)

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max_steps must be >= 1 (leave it out to train --num_train_epochs)")
        if self.streaming and not self.max_steps:
            raise ValueError("--streaming needs --max_steps (a stream has no length)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.init_from_timm and self.model_name_or_path:
            raise ValueError("--init_from_timm and --model_name_or_path are mutually exclusive")
        if self.dataset_name and self.train_dir:
            raise ValueError("Pass either --dataset_name or --train_dir, not both.")
        if self.train_dir and not Path(self.train_dir).is_dir():
            raise ValueError(f"--train_dir {self.train_dir!r} is not a directory")
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest") and not Path(resume).is_dir():
            raise ValueError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (nor 'latest')")
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        check_model_source(self.config_name, "--config_name")
        if self.model_preset not in ACE_PRESETS:
            raise ValueError(
                f"--model_preset {self.model_preset!r} is not one of {', '.join(sorted(ACE_PRESETS))}"
            )
        check_report_to(self.report_to)
        self.check_overrides()
        self.hub_token = self.hub_token or os.environ.get("HF_TOKEN")

    def check_overrides(self) -> None:
        """Refuse a --config_overrides or --augmentation_overrides field that does not exist or a value it cannot
        take, now rather than once the model is built. Both are tried on the config the run starts from (cheap:
        no weights); one on the Hub is not fetched here, so with it only their names and forms are checked."""
        if not (self.config_overrides or self.augmentation_overrides):
            return
        # Imported here, not above: they load torch, which `--help` and the other checks need not wait for.
        from ..configuration_ace import AceConfig
        from ..image_processing_ace import AceImageProcessor
        from .overrides import overridden_config, parse_overrides

        option = "--model_name_or_path" if self.model_name_or_path else "--config_name"
        source = self.model_name_or_path or self.config_name
        local = source is None or Path(source).expanduser().exists()
        if source and local:
            config = read_model_config(source, option, AceConfig)
        else:
            config = AceConfig.from_preset(self.model_preset)
        if self.config_overrides:
            config = overridden_config(config, self.config_overrides, validate=local)
        augmentation = parse_overrides(self.augmentation_overrides)
        if augmentation and local:
            try:
                AceImageProcessor.from_ace_config(config, **augmentation)
            except ValueError as error:
                raise ValueError(f"--augmentation_overrides {self.augmentation_overrides}: {error}") from None


__all__ = ["PretrainingArguments"]
