"""The fine-tuning loop, one for every task: train an epoch, score the validation set, keep the best epoch.

It is written out with Accelerate, as in the pretraining loop and accelerate's complete_nlp_example.py, rather
than hidden in transformers' Trainer, so that encoder freezing, per-epoch evaluation and best-model selection
read top to bottom in one file.

A run never writes over another run's model: an --output_dir holding one is refused unless
--overwrite_output_dir. At each epoch's end the training state (weights, optimizer, schedule, random states and
the best epoch so far) is saved with Accelerate's save_state into --output_dir/checkpoints (the last one is
kept), and --resume_from_checkpoint continues from it as the uninterrupted run would have: each epoch's
shuffling is seeded by --seed and the epoch alone.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
    get_scheduler,
)

from ..checkpointing import prepare_output_dir, save_checkpoint
from ..hub import check_push_target, push_to_hub
from ..optimization import parameter_groups
from ..runs import (
    check_resume,
    normal_file_permissions,
    read_run_record,
    run_fingerprint,
)
from .arguments import FinetuningArguments, score_names
from .card import write_model_card
from .data import Collator, DataError, TaskData, label_counts, load_processor, prepare_data
from .metrics import format_metrics, improved, task_metrics

logger = get_logger(__name__)

RESULTS_FILE = "eval_results.json"
# What save_best writes (safetensors writes its file 0600: given the normal permissions afterwards).
SAVED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", RESULTS_FILE)
# Checkpoints kept in --output_dir/checkpoints: the last epoch's, to resume from.
CHECKPOINTS_KEPT = 1


@dataclass
class RunState:
    """Where a run stands after an epoch: what its checkpoint records and what a resumed run starts from."""

    epoch: int = 0
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)


def build_model(args: FinetuningArguments, names: list[str]) -> PreTrainedModel:
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


def make_dataloaders(
    data: TaskData, collator: Collator, args: FinetuningArguments, shuffling: torch.Generator
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training batches shuffled by `shuffling` (seeded anew each epoch) and in-order validation batches."""
    train = torch.utils.data.DataLoader(
        data.train,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        generator=shuffling,
    )
    validation = torch.utils.data.DataLoader(
        data.validation,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )
    return train, validation


def set_train_mode(model: torch.nn.Module, frozen: torch.nn.Module | None) -> None:
    """Train mode, with a frozen encoder kept in eval mode (no dropout or drop-path: a fixed feature map)."""
    model.train()
    if frozen is not None:
        frozen.eval()


def train_epoch(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    progress: tqdm,
) -> float:
    """`steps` training batches: the whole epoch, or its start in the last epoch of a --max_steps run. Returns
    the mean training loss (over batches and processes)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in itertools.islice(dataloader, steps):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()  # summed on the device: no GPU sync per step
        progress.update(1)
    return accelerator.reduce(loss_sum, "mean").item() / steps


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


def evaluate(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    args: FinetuningArguments,
    names: list[str],
) -> dict[str, Any]:
    """Validation loss and the task's scores."""
    outputs, references, loss = predict(model, dataloader, accelerator, args.task == "segmentation")
    return {"loss": loss, **task_metrics(args.task_kind, outputs, references, names, args.ignore_index)}


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, so eval_results.json is strict JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
        (output_dir / RESULTS_FILE).write_text(json.dumps(json_safe(results), indent=2))
        normal_file_permissions(output_dir, SAVED_FILES)


def publish(output_dir: Path, args: FinetuningArguments, best: dict[str, Any]) -> None:
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


def run_bytes(model_name_or_path: str) -> int:
    """About what the best model and one checkpoint (weights and AdamW's two moments) take on disk: four times
    the encoder's weights when it is a local folder; a Hub model's size is not known before it downloads (0)."""
    folder = Path(model_name_or_path).expanduser()
    return 4 * sum(path.stat().st_size for path in folder.glob("*.safetensors")) if folder.is_dir() else 0


def fingerprint_of(
    args: FinetuningArguments,
    names: list[str],
    facts: dict[str, Any],
    steps_per_epoch: int,
    num_processes: int,
) -> dict[str, Any]:
    """What makes a checkpoint this run's: the model and its input, the task and its data, and what sets the
    steps (a longer schedule may continue a run: more epochs or steps are not in it)."""
    return run_fingerprint(
        model=args.model_name_or_path,
        size=args.size,
        resize_mode=args.resize_mode,
        freeze_encoder=args.freeze_encoder,
        task=args.task_kind,
        labels=names,
        data=facts,
        batch_size=args.per_device_train_batch_size,
        num_processes=num_processes,
        steps_per_epoch=steps_per_epoch,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )


def resume(
    accelerator: Accelerator, checkpoint: Path | None, fingerprint: dict[str, Any], total_steps: int
) -> RunState:
    """Load the checkpoint into the prepared model, optimizer and schedule after checking that it is this
    run's (RunMismatchError otherwise); a fresh RunState without one."""
    if checkpoint is None:
        return RunState()
    record = read_run_record(checkpoint)
    check_resume(checkpoint, record, fingerprint, total_steps=total_steps)
    state = RunState(**record["state"])
    accelerator.load_state(str(checkpoint))
    logger.info(f"Resumed from {checkpoint} after epoch {state.epoch} (step {state.step} of {total_steps}).")
    return state


def start_trackers(accelerator: Accelerator, args: FinetuningArguments) -> None:
    """The --report_to trackers, with the options as the run's hyperparameters; the log says where each one
    writes (tensorboard: --output_dir/ace-finetune)."""
    accelerator.init_trackers("ace-finetune", {k: v for k, v in asdict(args).items() if k != "hub_token"})
    for tracker in accelerator.trackers:
        where = getattr(tracker, "logging_dir", None)
        logger.info(f"Logging to {tracker.name}" + (f" in {where}" if where else ""))


def finetune(args: FinetuningArguments) -> dict[str, Any]:
    """Fine-tune (or, with `freeze_encoder`, linearly probe) an ACE encoder and save its best epoch to
    `output_dir`; returns that epoch's validation scores and the run's facts (as in eval_results.json)."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to, project_dir=str(output_dir)
    )
    if args.push_to_hub and accelerator.is_main_process:  # refused now rather than after the training
        check_push_target(args.hub_model_id, args.hub_token)
    set_seed(args.seed)
    logger.info(accelerator.state, main_process_only=False)
    checkpoint = prepare_output_dir(
        accelerator,
        output_dir,
        resume_from=args.resume_from_checkpoint,
        overwrite=args.overwrite_output_dir,
        needed_bytes=run_bytes(args.model_name_or_path),
        inputs={
            "--model_name_or_path": args.model_name_or_path,
            "--train_dir": args.train_dir,
            "--train_csv": args.train_csv,
            "--validation_csv": args.validation_csv,
        },
        also_clear=(RESULTS_FILE,),  # the scores of the model --overwrite_output_dir removes
    )

    processor = load_processor(args)
    with accelerator.main_process_first():
        data = prepare_data(args, processor)
    for name in data.skipped:
        logger.warning(f"Skipped unreadable file {name}")
    counts = label_counts(data) if args.task == "classification" else {}
    logger.info(
        f"{len(data.train)} training and {len(data.validation)} validation examples, "
        f"{len(data.label_names)} labels {counts or data.label_names}, {len(data.skipped)} unreadable skipped."
    )

    scores = score_names(args.task_kind, len(data.label_names))
    if args.best_metric not in scores:  # roc_auc needs two classes: known only once the data is read
        raise DataError(
            f"--metric_for_best_model {args.best_metric}: not computed for {len(data.label_names)} labels; "
            f"choose one of {', '.join(scores)}"
        )
    model = build_model(args, data.label_names)
    frozen = model.base_model.requires_grad_(False) if args.freeze_encoder else None
    shuffling = torch.Generator()
    train_dataloader, eval_dataloader = make_dataloaders(data, Collator(processor), args, shuffling)
    optimizer = torch.optim.AdamW(
        parameter_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    steps_per_epoch = len(train_dataloader)  # per process, after sharding
    total_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps, total_steps)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: it steps once per optimizer step

    metric = args.best_metric
    facts = {
        "train_samples": len(data.train),
        "eval_samples": len(data.validation),
        "skipped_images": len(data.skipped),
        "metric_for_best_model": metric,
    } | ({"train_samples_per_class": counts} if counts else {})
    fingerprint = fingerprint_of(args, data.label_names, facts, steps_per_epoch, accelerator.num_processes)
    run = resume(accelerator, checkpoint, fingerprint, total_steps)
    start_trackers(accelerator, args)
    progress = tqdm(
        total=total_steps, initial=run.step, desc="Training", disable=not accelerator.is_local_main_process
    )
    for epoch in range(run.epoch + 1, math.ceil(total_steps / steps_per_epoch) + 1):
        shuffling.manual_seed(args.seed + epoch - 1)
        set_train_mode(model, frozen)
        steps = min(steps_per_epoch, total_steps - run.step)
        train_loss = train_epoch(model, train_dataloader, steps, optimizer, scheduler, accelerator, progress)
        run.step += steps
        metrics = evaluate(model, eval_dataloader, accelerator, args, data.label_names)
        logger.info(f"epoch {epoch}: train loss {train_loss:.4f}; validation {format_metrics(metrics)}")
        scalars = {f"eval/{name}": value for name, value in metrics.items() if isinstance(value, float)}
        accelerator.log({"train/loss": train_loss, **scalars}, step=run.step)
        if improved(metrics, run.best, metric):
            run.best = {"epoch": epoch, "step": run.step, **metrics, **facts}
            save_best(accelerator, model, processor, output_dir, run.best)
            logger.info(f"Best {metric} so far ({metrics[metric]:.4f}): saved epoch {epoch} to {output_dir}")
        run.epoch = epoch
        record = {"fingerprint": fingerprint, "state": asdict(run)}
        save_checkpoint(accelerator, model, output_dir, run.step, CHECKPOINTS_KEPT, record)
    progress.close()

    if data.skipped:
        logger.warning(
            f"{len(data.skipped)} unreadable file(s) were skipped; their names are in the warnings above."
        )
    if accelerator.is_main_process:
        publish(output_dir, args, run.best)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.best
