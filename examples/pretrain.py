"""Pretrain an ACE encoder with Accelerate, then export (and optionally push) the teacher encoder.

    accelerate launch examples/pretrain.py                      # tiny preset on the built-in chest DRRs (CPU ok)
    accelerate launch examples/pretrain.py --train_dir my_xrays --model_preset ace-vit-b --mixed_precision bf16
    accelerate launch --num_processes 8 examples/pretrain.py --dataset_name org/cxr --model_preset ace-swin-b

The loop follows transformers' `*_no_trainer.py` examples. ACE specifics: views are cut in the data pipeline
(with --views_on_device, the default on CUDA, the workers only decode the images and draw the random view
parameters, and the views are cut on the device), correspondence targets and losses are computed on the device,
the teacher is updated by EMA only when gradients sync, and every schedule (lr, weight decay, teacher momentum
and temperature) is indexed by optimizer step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

import ace_hf
from ace_hf import AceConfig, AceForPreTraining, AceImageProcessor
from ace_hf.convert import init_from_timm
from ace_hf.hub import export_pretrained, pretraining_model_from_export, push_to_hub
from ace_hf.optimization import (
    AceSchedules,
    cancel_last_layer_gradients,
    initialize_optimizer_state,
    make_optimizer,
    scaled_learning_rate,
)
from ace_hf.pretraining.data import (
    ImageBatchCollator,
    IndexedDataset,
    ViewPairCollator,
    cut_batch_views,
    index_streaming_dataset,
    load_pretraining_dataset,
)
from ace_hf.runs import (
    LaunchError,
    OutputDirError,
    RunMismatchError,
    check_launch,
    check_output_dir,
    check_resume,
    clear_previous_run,
    close_segment,
    read_run_record,
    run_fingerprint,
    write_run_record,
)

logger = get_logger(__name__)
CHECKPOINT_PREFIX = "step_"
# Batches each data-loader worker keeps ready: slack for images that decode slowly (large PNGs, DICOM), at the
# cost of shared memory (a batch of 32 ace-vit-b sources is 128 MB; of views, 150 MB).
PREFETCH_FACTOR = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A Hub dataset (default: the built-in chest DRRs).")
    data.add_argument("--dataset_config_name")
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--train_dir", help="A folder of images, loaded with datasets' imagefolder.")
    data.add_argument("--image_column", default="image")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset (needs --max_steps).")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Shuffle buffer of a stream.")
    data.add_argument("--default_num_images", type=int, default=300, help="Size of the built-in DRR set.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument(
        "--views_on_device",
        action=argparse.BooleanOptionalAction,
        help="Cut, augment and normalize the views on the training device; the data-loader workers only decode, "
        "window and crop the images and draw the random view parameters (default: on when the device is CUDA).",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_preset", default="ace-vit-tiny", help="ace-vit-tiny, ace-vit-b or ace-swin-b."
    )
    model.add_argument("--config_name", help="A config.json (or folder) overriding the preset.")
    model.add_argument(
        "--config_overrides",
        help="Config fields to override, e.g. 'local_loss_weight=0,dino_out_dim=1024' (ablations, recipes).",
    )
    model.add_argument(
        "--model_name_or_path", help="Continue from a pretrained ACE encoder (folder or Hub id)."
    )
    model.add_argument(
        "--init_from_timm",
        help="Start student and teacher encoders from timm ImageNet weights: a timm model name (downloads) "
        "or a local .safetensors/.pth/.bin file or folder, as the official recipe does.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument(
        "--augmentation_overrides",
        help="Image processor augmentation fields to override, ranges as low:high, e.g. "
        "'brightness=0.2,contrast=0.2,sharpness=1.2:1.5' (the official code's albumentations defaults).",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/ace-pretrain")
    train.add_argument("--per_device_train_batch_size", type=int, default=16)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--learning_rate",
        type=float,
        default=2e-3,
        help="Base lr for a global batch of 256 (ACE's 5e-4 is for 300 epochs; see the README's recipe notes).",
    )
    train.add_argument("--min_learning_rate", type=float, default=1e-6)
    train.add_argument("--weight_decay", type=float, default=0.04)
    train.add_argument("--weight_decay_end", type=float, default=0.4)
    train.add_argument(
        "--max_grad_norm",
        type=float,
        default=0.8,
        help="Clip the global gradient norm (DINO's code clips each tensor; the global norm works with fp16 "
        "scaling, FSDP and DeepSpeed).",
    )
    train.add_argument("--num_train_epochs", type=int, default=54)
    train.add_argument("--max_steps", type=int, help="Optimizer steps; overrides --num_train_epochs.")
    train.add_argument("--warmup_epochs", type=float, default=5.0)
    train.add_argument("--freeze_last_layer_epochs", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("checkpoints, logging and the Hub")
    run.add_argument(
        "--checkpointing_steps", type=int, default=0, help="Save state every N steps (0: at the end)."
    )
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument(
        "--export_with_checkpoints", action="store_true", help="Also export the encoder each time."
    )
    run.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    run.add_argument(
        "--allow_run_changes",
        default="",
        help="Fields that may differ from the resumed checkpoint's run (e.g. 'learning_rate,total_steps', or "
        "'all'); they are recorded in the training summary and the model card.",
    )
    run.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the export and checkpoints of another run in --output_dir (refused otherwise).",
    )
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="none", help="tensorboard, wandb, all or none.")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id")
    run.add_argument("--hub_private_repo", action="store_true")
    run.add_argument("--hub_token", default=os.environ.get("HF_TOKEN"))
    run.add_argument(
        "--save_sample_ids", action="store_true", help="Write the example ids each process trained on."
    )
    args = parser.parse_args(argv)
    if args.streaming and not args.max_steps:
        parser.error("--streaming needs --max_steps (a stream has no length)")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.init_from_timm and args.model_name_or_path:
        parser.error("--init_from_timm and --model_name_or_path are mutually exclusive")
    return args


@dataclass
class TrainingState:
    """Progress saved with every checkpoint (in its run record, JSON, so that resuming unpickles nothing) so
    that a resume continues exactly: the optimizer step, the pass over the data in progress and the steps
    already taken in it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_images: int = 0


@contextmanager
def graceful_stop():
    """Ctrl-C or SIGTERM asks the loop to finish its step, save a checkpoint and exit; a second one aborts."""
    requested = {"stop": False}

    def handler(signum: int, frame) -> None:
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        logger.warning("Stop requested: saving a checkpoint after this step (signal again to abort at once).")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_config(args: argparse.Namespace) -> AceConfig:
    """The encoder's config (a continued encoder's, a config file's or a preset's), with --config_overrides."""
    if args.model_name_or_path:
        config = AceConfig.from_pretrained(args.model_name_or_path)
    elif args.config_name:
        config = AceConfig.from_pretrained(args.config_name)
    else:
        config = AceConfig.from_preset(args.model_preset)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
        config.validate_ace()
    return config


def parse_overrides(text: str | None) -> dict[str, float | tuple[float, float]]:
    """'a=0.2,b=1:2' -> {"a": 0.2, "b": (1.0, 2.0)}; the processor validates names and values."""
    overrides: dict[str, float | tuple[float, float]] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            numbers = tuple(float(part) for part in value.split(":"))
        except ValueError:
            raise ValueError(
                f"--augmentation_overrides: {item!r} is not key=number or key=low:high"
            ) from None
        overrides[key.strip()] = numbers[0] if len(numbers) == 1 else numbers
    unknown = sorted(set(overrides) - set(inspect.signature(AceImageProcessor).parameters) - {"kwargs"})
    if unknown:
        raise ValueError(f"--augmentation_overrides: AceImageProcessor has no field(s) {', '.join(unknown)}")
    return overrides


def build_model(args: argparse.Namespace, config: AceConfig) -> AceForPreTraining:
    """The pretraining model for `config` (build_config's), continued or initialized as the arguments say."""
    if args.model_name_or_path:  # with the export's pretraining heads when it ships them (the log says)
        return pretraining_model_from_export(
            args.model_name_or_path, config, token=args.hub_token, log=logger
        )
    model = AceForPreTraining(config)
    if args.init_from_timm:
        init_from_timm(model, args.init_from_timm)
    return model


def checkpoint_bytes(config: AceConfig) -> int:
    """About what one checkpoint and the export take on disk: float32 student and teacher, AdamW's two moments
    of the trained weights, and the exported encoder (sized on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = AceForPreTraining(config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return 4 * (total + 2 * trained + sum(p.numel() for p in model.teacher.parameters()))


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    found = [path for path in (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted(found, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)))


def broadcast_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Under FSDP, give every process the main process's buffers (BatchNorm running statistics), as DDP does
    before each forward: each process updates them from its own batch, and a sharded checkpoint keeps one copy
    (from any process), which a resumed run would then continue from."""
    if accelerator.distributed_type == DistributedType.FSDP:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: Path,
    step: int,
    total_limit: int,
    record: dict[str, Any],
) -> Path:
    """save_state and the run record into a temporary folder, then rename: a crash mid-save never leaves a
    half checkpoint, and a failed write (a full disk) removes its temporary folder and keeps the last one."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / "checkpoints" / f".partial-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    broadcast_buffers(accelerator, model)
    error: OSError | None = None
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            write_run_record(partial, record)
    except OSError as raised:
        error = raised
    # Every process learns whether any write failed (this is also the barrier after the writes), so all of
    # them stop together and the folder is removed only once nobody writes into it any more.
    if accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "max").item():
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        kept = checkpoint_dirs(output_dir)
        reason = f"{error.strerror or error}" if error else "another process failed to write"
        raise RuntimeError(
            f"Could not write the checkpoint at step {step} ({reason}); "
            + (f"the previous checkpoint {kept[-1]} is kept." if kept else "no earlier checkpoint exists.")
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoint_dirs(output_dir)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}")
    return final


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; refuse an older one of this folder while newer ones exist, or 'latest'
    and the checkpoint rotation would later pick up the abandoned attempt again."""
    found = checkpoint_dirs(output_dir)
    if resume_from == "latest":
        return found[-1] if found else None
    checkpoint = Path(resume_from)
    if not checkpoint.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} is not a checkpoint folder")
    if checkpoint.resolve().parent == (output_dir / "checkpoints").resolve():
        step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
        if newer := [path.name for path in found if int(path.name.removeprefix(CHECKPOINT_PREFIX)) > step]:
            raise RunMismatchError(
                f"{output_dir} holds checkpoints newer than {checkpoint.name} ({', '.join(newer)}): move them "
                "out of the folder to go back to this one, or resume from 'latest'."
            )
    return checkpoint


# Averaged between logs: the losses, and the local branch's matching accuracies (what it has learned).
LOSS_NAMES = (
    "loss",
    "global_loss",
    "local_loss",
    "decomposition_loss",
    "composition_loss",
    "decomposition_accuracy",
    "composition_accuracy",
)


class StepGuard:
    """Watch every step's loss on the device, and only every few steps ask all processes at once, in one
    all-reduce and one host sync, whether any saw a non-finite loss or a stop request: checking each step would
    make the host wait for the device at every step.

    A non-finite loss is caught at the next check, which always comes before a checkpoint is written, so the
    named last good checkpoint never holds weights updated from it.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad_step = torch.tensor(-1, device=device)
        self.first_bad_loss = torch.tensor(0.0, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first step whose loss is not finite (device-side, no sync)."""
        new = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(new, step, self.first_bad_step)
        self.first_bad_loss = torch.where(new, loss.detach().float(), self.first_bad_loss)

    def check(self, accelerator: Accelerator, stop_requested: bool, last_checkpoint: Path | None) -> bool:
        """Raise on any process's non-finite loss, on every process; return whether any process asked to stop."""
        bad = self.first_bad_step >= 0
        steps = torch.where(bad, -self.first_bad_step.float(), torch.tensor(-math.inf, device=bad.device))
        flags = torch.stack([bad.float(), torch.tensor(float(stop_requested), device=bad.device), steps])
        any_bad, any_stop, minus_first_step = accelerator.reduce(flags, reduction="max").tolist()
        if any_bad:
            where = (
                f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            )
            mine = f"{self.first_bad_loss.item()}" if bad else "finite"
            raise FloatingPointError(
                f"The loss became non-finite at optimizer step {int(-minus_first_step)} on at least one process "
                f"(this process: {mine}); stopping ({where}). "
                "Lower --learning_rate, or check the data and --mixed_precision."
            )
        return bool(any_stop)


def log_step(
    accelerator: Accelerator,
    progress: tqdm,
    step: int,
    running: dict[str, torch.Tensor],
    micro_batches: int,
    extra: dict[str, float],
) -> dict[str, float]:
    """Average the loss components since the last log, show and record them; returns what was logged.

    The sums stay on the device between logs, so the loop does not wait for the GPU at every step."""
    logs = {name: (value / micro_batches).item() for name, value in running.items()} | extra
    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    logger.info(f"step {step}: " + ", ".join(f"{name} {value:.4g}" for name, value in logs.items()))
    accelerator.log(logs, step=step)
    return logs


def check_replicas_in_sync(accelerator: Accelerator, model: AceForPreTraining) -> None:
    """Fail loudly if student or teacher weights, or the DINO center, differ between processes (under FSDP:
    the whole tensors each process sees, gathered one at a time)."""
    tensors = [*model.student.parameters(), *model.teacher.parameters(), model.dino_loss.center]
    fingerprints = torch.stack(
        [
            (whole.double().flatten() * torch.linspace(1, 2, whole.numel(), device=whole.device)).sum()
            for whole in map(whole_tensor, tensors)
        ]
    )
    gathered = accelerator.gather(fingerprints.unsqueeze(0))
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("Student/teacher weights differ between processes: the replicas drifted apart.")
    logger.info(f"Student and teacher weights are identical on all {accelerator.num_processes} process(es).")


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP shards it into a DTensor (gathering is collective)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def whole_model(
    accelerator: Accelerator, model: torch.nn.Module, ace: AceForPreTraining
) -> AceForPreTraining | None:
    """The pretraining model with whole weights on the main process, None elsewhere, to export from. Under FSDP
    each process holds a shard of every weight, so all of them take part in gathering the state dict."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return ace if accelerator.is_main_process else None
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    whole = AceForPreTraining(ace.config)
    whole.load_state_dict(state_dict)
    return whole


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        # non_blocking: batches from pinned memory (pin_memory on CUDA) reach the device without stalling the host.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    check_launch(accelerator.num_processes)
    set_seed(args.seed)
    logger.info(accelerator.state, main_process_only=False)

    config = build_config(args)
    checkpoint = (
        resolve_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    )
    check_output_dir(
        output_dir,
        resuming=checkpoint is not None,
        overwrite=args.overwrite_output_dir,
        needed_bytes=checkpoint_bytes(config),
        inputs={
            "--model_name_or_path": args.model_name_or_path,
            "--config_name": args.config_name,
            "--init_from_timm": args.init_from_timm,
        },
    )
    if args.overwrite_output_dir and checkpoint is None and accelerator.is_main_process:
        if removed := clear_previous_run(output_dir):
            logger.warning(
                f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} in {output_dir}"
            )
    accelerator.wait_for_everyone()

    model = build_model(args, config)
    config = model.config  # the model's own: loading an export or timm weights may adjust a copy
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # The dense head's BatchNorm statistics span all processes.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    processor = AceImageProcessor.from_ace_config(config, **parse_overrides(args.augmentation_overrides))

    with accelerator.main_process_first():
        dataset, data_description = load_pretraining_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_dir,
            args.image_column,
            args.dataset_split,
            args.streaming,
            default_num_images=args.default_num_images,
            default_image_size=config.grid_size * config.token_stride,
        )
    on_cuda = accelerator.device.type == "cuda"
    views_on_device = on_cuda if args.views_on_device is None else args.views_on_device
    collator = (ImageBatchCollator if views_on_device else ViewPairCollator)(
        processor, args.image_column, seed=args.seed
    )
    if args.streaming:
        # A stream is split by node here and its loader is not prepared (both would drop half the data).
        from datasets.distributed import split_dataset_by_node

        train_data = split_dataset_by_node(
            index_streaming_dataset(dataset, args.image_column),
            accelerator.process_index,
            accelerator.num_processes,
        ).shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
    else:
        train_data = IndexedDataset(dataset, args.image_column)
    train_dataloader = torch.utils.data.DataLoader(
        train_data,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        drop_last=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=on_cuda,
        persistent_workers=args.dataloader_num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if args.dataloader_num_workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed),
    )

    global_batch = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    )
    if args.streaming:  # a stream has no length: schedule "epochs" split --max_steps into --num_train_epochs
        steps_per_epoch = max(1, args.max_steps // args.num_train_epochs)
    else:
        batches = len(dataset) // (args.per_device_train_batch_size * accelerator.num_processes)
        # Accelerate also steps on an epoch's last, partial accumulation window.
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        if steps_per_epoch == 0:
            raise ValueError(
                f"The dataset ({len(dataset)} images) is smaller than one global batch ({global_batch})."
            )
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    schedules = AceSchedules(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        learning_rate=scaled_learning_rate(args.learning_rate, global_batch),
        min_learning_rate=args.min_learning_rate,
        warmup_epochs=min(args.warmup_epochs, total_steps / steps_per_epoch),
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        teacher_momentum=config.teacher_momentum,
        teacher_momentum_end=config.teacher_momentum_end,
        teacher_temperature=config.teacher_temperature,
        warmup_teacher_temperature=config.warmup_teacher_temperature,
        warmup_teacher_temperature_epochs=config.warmup_teacher_temperature_epochs,
        freeze_last_layer_epochs=args.freeze_last_layer_epochs,
    )
    optimizer = make_optimizer(model, schedules.learning_rate_at(0), accelerator.device)
    if args.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    initialize_optimizer_state(optimizer.optimizer)
    # The module itself, also under `accelerate launch --dynamo_backend`: for the EMA update and the export.
    ace = accelerator.unwrap_model(model, keep_torch_compile=False)
    state = TrainingState()
    fingerprint = run_fingerprint(
        config={
            k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        },
        augmentation=parse_overrides(args.augmentation_overrides),
        # The folder's name, not its path: the same data copied elsewhere (a job's scratch disk) is the same run.
        data={
            "source": args.dataset_name
            or (Path(args.train_dir).resolve().name if args.train_dir else "built-in"),
            "examples": None if args.streaming else len(dataset),
        },
        global_batch=global_batch,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        learning_rate=args.learning_rate,
        min_learning_rate=args.min_learning_rate,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        warmup_epochs=args.warmup_epochs,
        freeze_last_layer_epochs=args.freeze_last_layer_epochs,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        mixed_precision=accelerator.mixed_precision,
        ace_hf_version=ace_hf.__version__,
    )
    earlier_segments: list[dict[str, Any]] = []
    changes: dict[str, list[Any]] = {}
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info("No checkpoint in the output folder yet: starting from scratch.")
    elif checkpoint is not None:
        record = read_run_record(checkpoint)
        allowed = {name.strip() for name in args.allow_run_changes.split(",") if name.strip()}
        changes = check_resume(record, fingerprint, total_steps=total_steps, allowed=allowed)
        accelerator.load_state(str(checkpoint))
        for name, value in record["state"].items():
            setattr(state, name, value)
        earlier_segments = record["segments"]
        logger.info(f"Resumed from {checkpoint} at optimizer step {state.step} of {total_steps}.")
        if changes:
            logger.warning(f"Resuming with deliberate changes (recorded in the summary and card): {changes}")
    segment_start = state.step
    accelerator.init_trackers("ace-pretrain", {k: v for k, v in vars(args).items() if k != "hub_token"})
    logger.info(
        f"Pretraining {config.backbone_type} ({sum(p.numel() for p in ace.ace.parameters()) / 1e6:.1f}M encoder "
        f"parameters) on {data_description}: {total_steps} steps, global batch {global_batch}, "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}."
    )
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    last_layer = list(ace.student.global_head.last_layer.parameters())
    running: dict[str, torch.Tensor] = {}
    micro_batches = 0
    final_logs: dict[str, float] = {}
    seen_ids: list[int] = []
    last_checkpoint: Path | None = None
    start_time = time.perf_counter()

    def run_segments() -> list[dict[str, Any]]:
        """Every segment of the run: those of the resumed checkpoint, and this one up to now."""
        return close_segment(
            earlier_segments, segment_start, state.step, time.perf_counter() - start_time, changes
        )

    def run_record() -> dict[str, Any]:
        return {"state": asdict(state), "fingerprint": fingerprint, "segments": run_segments()}

    interrupted = False
    guard = StepGuard(accelerator.device)
    # Host syncs: at least every 10 steps, so a stop request (SIGTERM's grace period) is acted on quickly.
    sync_steps = min(args.logging_steps, 10)
    with graceful_stop() as stop:
        while state.step < total_steps and not interrupted:
            collator.epoch = state.epoch
            for epoch_aware in (train_dataloader, train_data):  # shuffles depend on (seed, epoch) only
                if hasattr(epoch_aware, "set_epoch"):
                    epoch_aware.set_epoch(state.epoch)
            batches = train_dataloader
            if state.step_in_epoch:
                skip = state.step_in_epoch * args.gradient_accumulation_steps
                batches = accelerator.skip_first_batches(train_dataloader, skip)
            step_at_epoch_start = state.step
            for batch in batches:
                if views_on_device:
                    batch = cut_batch_views(processor, batch, accelerator.device)
                for name in batch["skipped"]:
                    logger.warning(f"Skipped unreadable image {name}", main_process_only=False)
                state.skipped_images += len(batch["skipped"])
                if args.save_sample_ids:
                    seen_ids.extend(batch["sample_ids"].tolist())
                with accelerator.accumulate(model):
                    schedules.apply_to_optimizer(optimizer, state.step)
                    outputs = model(
                        pixel_values_large=batch["pixel_values_large"].to(accelerator.device),
                        pixel_values_small=batch["pixel_values_small"].to(accelerator.device),
                        view_origins=batch["view_origins"].to(accelerator.device),
                        # A 0-dim CPU tensor: no recompiling under torch.compile, no copy to the device.
                        teacher_temperature=torch.tensor(schedules.teacher_temperature_at(state.step)),
                    )
                    guard.observe(outputs.loss, state.step)
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        if schedules.last_layer_frozen(state.step):
                            cancel_last_layer_gradients(last_layer)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for name in LOSS_NAMES:
                    running[name] = running.get(name, 0.0) + getattr(outputs, name).detach()
                micro_batches += 1
                if not accelerator.sync_gradients:
                    continue

                momentum = schedules.teacher_momentum_at(state.step)
                ace.update_teacher(momentum)
                state.step += 1
                state.step_in_epoch += 1
                progress.update(1)
                checkpoint_due = args.checkpointing_steps and state.step % args.checkpointing_steps == 0
                if state.step % sync_steps == 0 or checkpoint_due or state.step == total_steps:
                    interrupted = guard.check(accelerator, stop["stop"], last_checkpoint)
                if state.step % args.logging_steps == 0 or state.step == total_steps:
                    extra = {
                        "lr": optimizer.param_groups[0]["lr"],
                        "teacher_momentum": momentum,
                        "epoch": state.epoch,
                    }
                    final_logs = log_step(accelerator, progress, state.step, running, micro_batches, extra)
                    running, micro_batches = {}, 0
                if checkpoint_due:
                    last_checkpoint = save_checkpoint(
                        accelerator, model, output_dir, state.step, args.checkpoints_total_limit, run_record()
                    )
                    if (
                        args.export_with_checkpoints
                        and (whole := whole_model(accelerator, model, ace)) is not None
                    ):
                        export_pretrained(
                            whole.export_teacher(),
                            processor,
                            last_checkpoint / "encoder",
                            pretraining_heads=whole,
                        )
                if state.step >= total_steps or interrupted:
                    break
            else:  # the pass over the data is complete
                if state.step == step_at_epoch_start and not state.step_in_epoch:
                    raise ValueError(
                        f"The dataset yields no full batch of {args.per_device_train_batch_size}."
                    )
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
    progress.close()

    if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{state.step}":
        last_checkpoint = save_checkpoint(
            accelerator, model, output_dir, state.step, args.checkpoints_total_limit, run_record()
        )
    check_replicas_in_sync(accelerator, ace)
    skipped = int(
        accelerator.reduce(torch.tensor(state.skipped_images, device=accelerator.device), "sum").item()
    )
    if args.save_sample_ids:
        (output_dir / f"sample_ids_rank{accelerator.process_index}.json").write_text(json.dumps(seen_ids))
    summary = {
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": round(state.step / steps_per_epoch, 2),
        "interrupted": interrupted,
        "global_batch_size": global_batch,
        "processes": accelerator.num_processes,
        "dataset": data_description,
        "skipped_images": skipped,
        # The same --seed draws other starting weights under another torch: 2.11 and 2.14 sample
        # trunc_normal_ differently.
        "torch_version": torch.__version__,
        "segments": (segments := run_segments()),
        "wall_time_s": round(sum(segment["wall_time_s"] for segment in segments), 1),
        **{f"final_{name}": round(value, 5) for name, value in final_logs.items() if name in LOSS_NAMES},
    }
    if skipped:
        logger.warning(f"{skipped} unreadable image(s) were skipped; their names are in the warnings above.")
    if interrupted:
        logger.warning(f"Stopped at step {state.step}: continue with --resume_from_checkpoint latest.")
    elif (whole := whole_model(accelerator, model, ace)) is not None:
        card_summary = {key: value for key, value in summary.items() if key != "interrupted"}
        export_pretrained(
            whole.export_teacher(),
            processor,
            output_dir,
            model_id=args.hub_model_id,
            training_summary=card_summary,
            dataset_names=[args.dataset_name] if args.dataset_name else None,  # Hub ids only reach the card
            base_model=args.model_name_or_path,  # likewise
            pretraining_heads=whole,
        )
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"Done: {json.dumps(summary)}. Exported the teacher encoder to {output_dir}.")
        if args.push_to_hub:
            url = push_to_hub(
                output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token
            )
            logger.info(f"Pushed {output_dir} to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (LaunchError, OutputDirError, RunMismatchError) as error:
        sys.exit(f"error: {error}")  # refused before anything was loaded or written: one line, no traceback
