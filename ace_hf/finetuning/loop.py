"""The fine-tuning loop, one for every task: train an epoch, score the validation set, keep the best epoch.

It is written out with Accelerate, as in the pretraining loop and accelerate's complete_nlp_example.py, rather
than hidden in transformers' Trainer, so that encoder freezing, per-epoch evaluation and best-model selection
read top to bottom in one file.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
    get_scheduler,
)

from ..hub import push_to_hub
from ..optimization import parameter_groups
from .arguments import FinetuningArguments
from .card import write_model_card
from .data import Collator, TaskData, label_counts, prepare_data
from .metrics import format_metrics, improved, task_metrics

logger = get_logger(__name__)


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
    data: TaskData, collator: Collator, args: FinetuningArguments
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


def set_train_mode(model: torch.nn.Module, frozen: torch.nn.Module | None) -> None:
    """Train mode, with a frozen encoder kept in eval mode (no dropout or drop-path: a fixed feature map)."""
    model.train()
    if frozen is not None:
        frozen.eval()


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
        (output_dir / "eval_results.json").write_text(json.dumps(json_safe(results), indent=2))


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


def finetune(args: FinetuningArguments) -> dict[str, Any]:
    """Fine-tune (or, with `freeze_encoder`, linearly probe) an ACE encoder and save its best epoch to
    `output_dir`; returns that epoch's validation scores and the run's facts (as in eval_results.json)."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator()
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

    metric = args.best_metric
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
