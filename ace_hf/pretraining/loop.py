"""The pretraining loop: `pretrain(PretrainingArguments(...))` trains, checkpoints and exports an ACE encoder.

The loop follows transformers' `*_no_trainer.py` examples. ACE specifics: views are cut in the data pipeline
(with `views_on_device`, the default on CUDA, the workers only decode the images and draw the random view
parameters, and the views are cut on the device), correspondence targets and losses are computed on the device,
the teacher is updated by EMA only when gradients sync, and every schedule (lr, weight decay, teacher momentum
and temperature) is indexed by optimizer step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from .. import __version__
from ..checkpointing import prepare_output_dir, save_checkpoint
from ..configuration_ace import AceConfig
from ..convert import init_from_timm
from ..hub import check_push_target, export_pretrained, pretraining_model_from_export, push_to_hub
from ..image_processing_ace import AceImageProcessor
from ..modeling_ace import AceForPreTraining
from ..optimization import (
    AceSchedules,
    cancel_last_layer_gradients,
    initialize_optimizer_state,
    make_optimizer,
)
from ..runs import (
    CHECKPOINT_PREFIX,
    check_launch,
    check_resume,
    close_segment,
    finished_run_summary,
    read_run_record,
    run_fingerprint,
)
from .arguments import PretrainingArguments
from .checkpoints import checkpoint_bytes, whole_model
from .data import (
    ImageBatchCollator,
    IndexedDataset,
    ViewPairCollator,
    cut_batch_views,
    index_streaming_dataset,
    load_pretraining_dataset,
)
from .guard import CheckSchedule, StepGuard, check_replicas_in_sync, graceful_stop
from .overrides import overridden_config, parse_overrides
from .recipe import OPTIMIZATION_FIELDS, PretrainingRecipe

logger = get_logger(__name__)
# Batches each data-loader worker keeps ready: slack for images that decode slowly (large PNGs, DICOM), at the
# cost of shared memory (a batch of 32 ace-vit-b sources is 128 MB; of views, 150 MB).
PREFETCH_FACTOR = 4
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


@dataclass
class TrainingState:
    """Progress saved with every checkpoint (in its run record, JSON, so that resuming unpickles nothing) so
    that a resume continues exactly: the optimizer step, the pass over the data in progress and the steps
    already taken in it; and the unreadable files met so far (each counted once, however often it is read)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_files: list[str] = field(default_factory=list)


@dataclass
class PretrainingResult:
    """Where the run went, and its training summary (also in `output_dir/training_summary.json` when exported)."""

    output_dir: Path
    summary: dict[str, Any]
    exported: bool


@dataclass
class TrainingData:
    """The loader of one run and what the loop needs to know about it."""

    dataloader: torch.utils.data.DataLoader
    collator: ImageBatchCollator
    examples: torch.utils.data.Dataset | Any
    size: int | None  # None for a stream
    description: str
    views_on_device: bool


@dataclass
class StepPlan:
    """How many optimizer steps the run takes, and over how large a global batch."""

    total_steps: int
    steps_per_epoch: int
    global_batch: int


def build_config(args: PretrainingArguments) -> AceConfig:
    """The encoder's config (a continued encoder's, a config file's or a preset's), with `config_overrides`."""
    if args.model_name_or_path:
        config = AceConfig.from_pretrained(args.model_name_or_path)
    elif args.config_name:
        config = AceConfig.from_pretrained(args.config_name)
    else:
        config = AceConfig.from_preset(args.model_preset)
    return overridden_config(config, args.config_overrides) if args.config_overrides else config


def build_model(args: PretrainingArguments, config: AceConfig) -> AceForPreTraining:
    """The pretraining model for `config` (build_config's), continued or initialized as the arguments say."""
    if args.model_name_or_path:  # with the export's pretraining heads when it ships them (the log says)
        return pretraining_model_from_export(
            args.model_name_or_path, config, token=args.hub_token, log=logger
        )
    model = AceForPreTraining(config)
    if args.init_from_timm:
        init_from_timm(model, args.init_from_timm)
    return model


def load_training_data(
    args: PretrainingArguments,
    accelerator: Accelerator,
    processor: AceImageProcessor,
    config: AceConfig,
) -> TrainingData:
    """The dataset, its collator (views cut on the workers or on the device) and its loader, not yet prepared."""
    with accelerator.main_process_first():
        dataset, description = load_pretraining_dataset(
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

        examples = split_dataset_by_node(
            index_streaming_dataset(dataset, args.image_column),
            accelerator.process_index,
            accelerator.num_processes,
        ).shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
    else:
        examples = IndexedDataset(dataset, args.image_column)
    workers = args.dataloader_num_workers
    dataloader = torch.utils.data.DataLoader(
        examples,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        drop_last=True,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=on_cuda,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed),
    )
    size = None if args.streaming else len(dataset)
    return TrainingData(dataloader, collator, examples, size, description, views_on_device)


def plan_steps(
    args: PretrainingArguments, recipe: PretrainingRecipe, data: TrainingData, processes: int
) -> StepPlan:
    """Steps per epoch and in all, from the data size (a stream splits `max_steps` into the recipe's epochs)."""
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    epochs = recipe.optimization.num_train_epochs
    if data.size is None:  # a stream has no length: schedule "epochs" split max_steps into num_train_epochs
        steps_per_epoch = max(1, args.max_steps // epochs)
    else:
        batches = data.size // (args.per_device_train_batch_size * processes)
        # Accelerate also steps on an epoch's last, partial accumulation window.
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        if steps_per_epoch == 0:
            raise ValueError(
                f"The dataset ({data.size} images) is smaller than one global batch ({global_batch})."
            )
    return StepPlan(args.max_steps or steps_per_epoch * epochs, steps_per_epoch, global_batch)


def fingerprint_of(
    args: PretrainingArguments,
    config: AceConfig,
    recipe: PretrainingRecipe,
    data: TrainingData,
    plan: StepPlan,
    mixed_precision: str,
) -> dict[str, Any]:
    """What makes this run this run: a resume with other values is refused unless allowed."""
    # The epochs are in total_steps; the method half of the recipe is in the config.
    optimization = {k: v for k, v in asdict(recipe.optimization).items() if k != "num_train_epochs"}
    return run_fingerprint(
        config={
            k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        },
        augmentation=parse_overrides(args.augmentation_overrides),
        # The folder's name, not its path: the same data copied elsewhere (a job's scratch disk) is the same run.
        data={
            "source": args.dataset_name
            or (Path(args.train_dir).resolve().name if args.train_dir else "built-in"),
            "examples": data.size,
        },
        global_batch=plan.global_batch,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        **optimization,
        seed=args.seed,
        mixed_precision=mixed_precision,
        ace_hf_version=__version__,
    )


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedules: AceSchedules,
    step: int,
    batch: dict[str, torch.Tensor],
    backward: Any,
    clip_grad_norm: Any,
    max_grad_norm: float,
    last_layer: list[torch.nn.Parameter],
    sync_gradients: bool = True,
) -> Any:
    """One micro-batch of ACE pretraining: schedules, forward, backward and, when gradients sync, clipping, the
    last-layer freeze and the optimizer step. Returns the model's outputs (the losses).

    `backward` and `clip_grad_norm` are Accelerate's in the loop (`accelerator.backward`,
    `accelerator.clip_grad_norm_`) and torch's in the benchmark, which times this very step.
    """
    schedules.apply_to_optimizer(optimizer, step)
    outputs = model(
        pixel_values_large=batch["pixel_values_large"],
        pixel_values_small=batch["pixel_values_small"],
        view_origins=batch["view_origins"],
        # A 0-dim CPU tensor: no recompiling under torch.compile, no copy to the device.
        teacher_temperature=torch.tensor(schedules.teacher_temperature_at(step)),
    )
    backward(outputs.loss)
    if sync_gradients:
        clip_grad_norm(model.parameters(), max_grad_norm)
        if schedules.last_layer_frozen(step):
            cancel_last_layer_gradients(last_layer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return outputs


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


@dataclass
class RunRecord:
    """The run's history across resumes: the fingerprint, the earlier segments and this one's start."""

    fingerprint: dict[str, Any]
    state: TrainingState
    earlier_segments: list[dict[str, Any]] = field(default_factory=list)
    changes: dict[str, list[Any]] = field(default_factory=dict)
    segment_start: int = 0
    start_time: float = field(default_factory=time.perf_counter)

    def segments(self) -> list[dict[str, Any]]:
        """Every segment of the run: those of the resumed checkpoint, and this one up to now."""
        return close_segment(
            self.earlier_segments,
            self.segment_start,
            self.state.step,
            time.perf_counter() - self.start_time,
            self.changes,
        )

    def as_dict(self) -> dict[str, Any]:
        return {"state": asdict(self.state), "fingerprint": self.fingerprint, "segments": self.segments()}


def resume(
    accelerator: Accelerator,
    args: PretrainingArguments,
    checkpoint: Path | None,
    fingerprint: dict[str, Any],
    total_steps: int,
) -> RunRecord:
    """Load the checkpoint (after checking that it is this run's) into the prepared objects, or start afresh."""
    run = RunRecord(fingerprint, TrainingState())
    if checkpoint is None:
        return run
    record = read_run_record(checkpoint)
    allowed = {name.strip() for name in args.allow_run_changes.split(",") if name.strip()}
    run.changes = check_resume(checkpoint, record, fingerprint, total_steps=total_steps, allowed=allowed)
    accelerator.load_state(str(checkpoint))
    # Checkpoints written before 2026-12-03 counted skipped reads (`skipped_images`), not files: their names are
    # in that run's log, not in the checkpoint, so the count restarts here.
    saved = {key: value for key, value in record["state"].items() if key != "skipped_images"}
    run.state = TrainingState(**saved)
    run.earlier_segments = record["segments"]
    run.segment_start = run.state.step
    logger.info(f"Resumed from {checkpoint} at optimizer step {run.state.step} of {total_steps}.")
    if run.changes:
        logger.warning(f"Resuming with deliberate changes (recorded in the summary and card): {run.changes}")
    return run


def pretrain(args: PretrainingArguments) -> PretrainingResult:
    """Pretrain an ACE encoder as `args` say, then export the teacher encoder (and push it when asked).

    Works on one CPU, one GPU or many (launch with `accelerate launch -m ace_hf pretrain ...`); an interrupted
    run (Ctrl-C, SIGTERM) saves a checkpoint and returns with `exported=False`; resuming a run that has already
    ended and been exported returns its summary and writes nothing.
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        # non_blocking: batches from pinned memory (pin_memory on CUDA) reach the device without stalling the host.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.push_to_hub and accelerator.is_main_process:  # refused now rather than after the training
        check_push_target(args.hub_model_id, args.hub_token)
    check_launch(accelerator.num_processes)
    set_seed(args.seed)
    logger.info(accelerator.state, main_process_only=False)

    config = build_config(args)
    checkpoint = prepare_output_dir(
        accelerator,
        output_dir,
        resume_from=args.resume_from_checkpoint,
        overwrite=args.overwrite_output_dir,
        needed_bytes=checkpoint_bytes(config),
        inputs={
            "--model_name_or_path": args.model_name_or_path,
            "--config_name": args.config_name,
            "--init_from_timm": args.init_from_timm,
        },
    )
    model = build_model(args, config)
    config = model.config  # the model's own: loading an export or timm weights may adjust a copy
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # The dense head's BatchNorm statistics span all processes.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    processor = AceImageProcessor.from_ace_config(config, **parse_overrides(args.augmentation_overrides))
    recipe = PretrainingRecipe.resolve(
        args.model_preset, config, {name: getattr(args, name) for name in OPTIMIZATION_FIELDS}
    )
    data = load_training_data(args, accelerator, processor, config)
    plan = plan_steps(args, recipe, data, accelerator.num_processes)
    schedules = recipe.schedules(plan.total_steps, plan.steps_per_epoch, plan.global_batch)
    optimizer = make_optimizer(model, schedules.learning_rate_at(0), accelerator.device)
    if args.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, data.dataloader = accelerator.prepare(model, optimizer, data.dataloader)
    initialize_optimizer_state(optimizer.optimizer)
    # The module itself, also under `accelerate launch --dynamo_backend`: for the EMA update and the export.
    ace = accelerator.unwrap_model(model, keep_torch_compile=False)
    fingerprint = fingerprint_of(args, config, recipe, data, plan, accelerator.mixed_precision)
    run = resume(accelerator, args, checkpoint, fingerprint, plan.total_steps)
    if (finished := finished_run_summary(output_dir, run.state.step, plan.total_steps)) is not None:
        logger.info(
            f"The run in {output_dir} is finished (step {run.state.step}) and exported: nothing to do."
        )
        accelerator.end_training()
        return PretrainingResult(output_dir, finished, exported=True)
    accelerator.init_trackers("ace-pretrain", {k: v for k, v in asdict(args).items() if k != "hub_token"})
    for tracker in accelerator.trackers:  # tensorboard's event files; wandb's local copy of the run
        folder = getattr(tracker, "logging_dir", None) or getattr(getattr(tracker, "run", None), "dir", None)
        logger.info(f"Logging to {tracker.name} in {folder}")
    logger.info(
        f"Pretraining {config.backbone_type} ({sum(p.numel() for p in ace.ace.parameters()) / 1e6:.1f}M encoder "
        f"parameters) on {data.description}: {plan.total_steps} steps, global batch {plan.global_batch}, "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}."
    )
    interrupted, final_logs, seen_ids = train(
        accelerator, args, model, ace, optimizer, processor, data, plan, schedules, recipe, run, output_dir
    )
    check_replicas_in_sync(accelerator, ace)
    if args.save_sample_ids:
        (output_dir / f"sample_ids_rank{accelerator.process_index}.json").write_text(json.dumps(seen_ids))
    summary = training_summary(accelerator, run, plan, recipe, data, interrupted, final_logs)
    exported = not interrupted and export(accelerator, args, model, ace, processor, output_dir, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # trackers flushed before the upload, which may fail
    if exported and args.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token)
        logger.info(f"Pushed {output_dir} to {url}")
    return PretrainingResult(output_dir, summary, exported)


def train(
    accelerator: Accelerator,
    args: PretrainingArguments,
    model: torch.nn.Module,
    ace: AceForPreTraining,
    optimizer: torch.optim.Optimizer,
    processor: AceImageProcessor,
    data: TrainingData,
    plan: StepPlan,
    schedules: AceSchedules,
    recipe: PretrainingRecipe,
    run: RunRecord,
    output_dir: Path,
) -> tuple[bool, dict[str, float], list[int]]:
    """Train from `run.state` to the end (or a stop request) and save a checkpoint there; returns (interrupted,
    the last logs, the example ids seen when asked for)."""
    state = run.state
    progress = tqdm(total=plan.total_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    last_layer = list(ace.student.global_head.last_layer.parameters())
    running: dict[str, torch.Tensor] = {}
    micro_batches, final_logs, seen_ids, last_checkpoint = 0, {}, [], None
    interrupted = False
    guard = StepGuard(accelerator.device)
    # Host syncs: at least every 10 steps, so that several processes act on a stop request (SIGTERM's grace
    # period) quickly; one process acts on it at the next step, which needs no sync.
    checks = CheckSchedule(min(args.logging_steps, 10), args.checkpointing_steps, plan.total_steps)
    alone = accelerator.num_processes == 1
    warned: set[str] = set()

    def stop_step() -> int:
        """Where a stop asked for now takes effect: the next step alone, the next check with other processes."""
        return min(state.step + 1, plan.total_steps) if alone else checks.next_check(state.step)

    with graceful_stop(stop_step) as stop:
        while state.step < plan.total_steps and not interrupted:
            data.collator.epoch = state.epoch
            for epoch_aware in (data.dataloader, data.examples):  # shuffles depend on (seed, epoch) only
                if hasattr(epoch_aware, "set_epoch"):
                    epoch_aware.set_epoch(state.epoch)
            batches = data.dataloader
            if state.step_in_epoch:
                skip = state.step_in_epoch * args.gradient_accumulation_steps
                batches = accelerator.skip_first_batches(data.dataloader, skip)
            step_at_epoch_start = state.step
            for batch in batches:
                if data.views_on_device:
                    batch = cut_batch_views(processor, batch, accelerator.device)
                for name, reason in zip(batch["skipped_files"], batch["skipped"], strict=True):
                    if name not in warned:  # a bad file is read again each epoch: named once
                        warned.add(name)
                        state.skipped_files.append(name)
                        logger.warning(f"Skipped unreadable file {reason}", main_process_only=False)
                if args.save_sample_ids:
                    seen_ids.extend(batch["sample_ids"].tolist())
                inputs = {key: batch[key].to(accelerator.device) for key in ACE_INPUTS}
                with accelerator.accumulate(model):
                    outputs = training_step(
                        model,
                        optimizer,
                        schedules,
                        state.step,
                        inputs,
                        accelerator.backward,
                        accelerator.clip_grad_norm_,
                        recipe.optimization.max_grad_norm,
                        last_layer,
                        sync_gradients=accelerator.sync_gradients,
                    )
                    guard.observe(outputs.loss, state.step)
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
                stop_due = stop.due(state.step)
                # Alone, a stop is acted on at once; the guards still run before its checkpoint.
                if checks.is_check(state.step) or (stop_due and alone):
                    interrupted = guard.check(accelerator, stop_due, last_checkpoint)
                if state.step % args.logging_steps == 0 or state.step == plan.total_steps:
                    extra = {
                        "lr": optimizer.param_groups[0]["lr"],
                        "teacher_momentum": momentum,
                        "epoch": state.epoch,
                    }
                    final_logs = log_step(accelerator, progress, state.step, running, micro_batches, extra)
                    running, micro_batches = {}, 0
                if checkpoint_due:
                    gather_skipped_files(state)
                    last_checkpoint = save_checkpoint(
                        accelerator,
                        model,
                        output_dir,
                        state.step,
                        args.checkpoints_total_limit,
                        run.as_dict(),
                    )
                    if args.export_with_checkpoints and (whole := whole_model(accelerator, model, ace)):
                        export_pretrained(
                            whole.export_teacher(),
                            processor,
                            last_checkpoint / "encoder",
                            pretraining_heads=whole,
                        )
                if state.step >= plan.total_steps or interrupted:
                    break
            else:  # the pass over the data is complete
                if state.step == step_at_epoch_start and not state.step_in_epoch:
                    raise ValueError(
                        f"The dataset yields no full batch of {args.per_device_train_batch_size}."
                    )
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        progress.close()
        # Still under graceful_stop: the signal a launcher sends after the user's Ctrl-C must not kill this save.
        gather_skipped_files(state)
        if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{state.step}":
            save_checkpoint(
                accelerator, model, output_dir, state.step, args.checkpoints_total_limit, run.as_dict()
            )
    return interrupted, final_logs, seen_ids


# The model inputs of a batch of view pairs (its other entries are bookkeeping: sample ids, skipped files).
ACE_INPUTS = ("pixel_values_large", "pixel_values_small", "view_origins")


def gather_skipped_files(state: TrainingState) -> None:
    """Give every process the unreadable files any process met (each once), so that the checkpoint, written by
    the main process, and the summary count every bad file of the run once. Collective: all processes call it."""
    state.skipped_files = sorted(set(gather_object(state.skipped_files)))


def training_summary(
    accelerator: Accelerator,
    run: RunRecord,
    plan: StepPlan,
    recipe: PretrainingRecipe,
    data: TrainingData,
    interrupted: bool,
    final_logs: dict[str, float],
) -> dict[str, Any]:
    """What the run did, for training_summary.json and the model card."""
    skipped = len(run.state.skipped_files)  # gathered from every process with the last checkpoint
    segments = run.segments()
    if skipped:
        logger.warning(f"{skipped} unreadable file(s) skipped; each is named in a warning where first met.")
    if interrupted:
        logger.warning(f"Stopped at step {run.state.step}: continue with --resume_from_checkpoint latest.")
    return {
        "steps": run.state.step,
        "total_steps": plan.total_steps,
        "epochs": round(run.state.step / plan.steps_per_epoch, 2),
        "interrupted": interrupted,
        "global_batch_size": plan.global_batch,
        "processes": accelerator.num_processes,
        "dataset": data.description,
        "skipped_images": skipped,
        # The same seed draws other starting weights under another torch: 2.11 and 2.14 sample trunc_normal_
        # differently.
        "torch_version": torch.__version__,
        "recipe": recipe.as_dict(),
        "segments": segments,
        "wall_time_s": round(sum(segment["wall_time_s"] for segment in segments), 1),
        **{f"final_{name}": round(value, 5) for name, value in final_logs.items() if name in LOSS_NAMES},
    }


def export(
    accelerator: Accelerator,
    args: PretrainingArguments,
    model: torch.nn.Module,
    ace: AceForPreTraining,
    processor: AceImageProcessor,
    output_dir: Path,
    summary: dict[str, Any],
) -> bool:
    """Export the teacher encoder with its card and summary, on the main process."""
    whole = whole_model(accelerator, model, ace)
    if whole is None:
        return True
    export_pretrained(
        whole.export_teacher(),
        processor,
        output_dir,
        model_id=args.hub_model_id,
        training_summary={key: value for key, value in summary.items() if key != "interrupted"},
        dataset_names=[args.dataset_name] if args.dataset_name else None,  # Hub ids only reach the card
        base_model=args.model_name_or_path,  # likewise
        pretraining_heads=whole,
    )
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info(f"Done: {json.dumps(summary)}. Exported the teacher encoder to {output_dir}.")
    return True


__all__ = ["PretrainingResult", "build_config", "build_model", "pretrain", "training_step"]
