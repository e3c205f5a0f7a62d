"""Checkpoints of a training run (pretraining or fine-tuning): the output folder prepared across processes, atomic
writes and rotation.

A checkpoint is `accelerator.save_state` plus the run record (`ace_hf.runs`), written into a temporary folder
and renamed, so a crash mid-save never leaves half a checkpoint. Where checkpoints live and which one to resume
from is `ace_hf.runs`' part (`checkpoint_dirs`, `resolve_checkpoint`).

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType

from .runs import (
    CHECKPOINT_PREFIX,
    check_output_dir,
    checkpoint_dirs,
    clear_previous_run,
    resolve_checkpoint,
    write_run_record,
)

logger = get_logger(__name__)


def prepare_output_dir(
    accelerator: Accelerator,
    output_dir: Path,
    *,
    resume_from: str | None,
    overwrite: bool,
    needed_bytes: int,
    inputs: Mapping[str, str | None],
    also_clear: Iterable[str] = (),
) -> Path | None:
    """What every run does with its --output_dir before loading anything: resolve --resume_from_checkpoint,
    refuse the folder as `check_output_dir` says, and with --overwrite_output_dir (not resuming) clear the
    earlier run's work (and `also_clear`). Returns the checkpoint to resume from, if any."""
    checkpoint = resolve_checkpoint(resume_from, output_dir) if resume_from else None
    if resume_from and checkpoint is None:
        logger.info(f"No checkpoint in {output_dir / 'checkpoints'} yet: starting from scratch.")
    check_output_dir(
        output_dir,
        resuming=checkpoint is not None,
        overwrite=overwrite,
        needed_bytes=needed_bytes,
        inputs=inputs,
    )
    if overwrite and checkpoint is None and accelerator.is_main_process:
        if removed := clear_previous_run(output_dir, also_clear):
            logger.warning(
                f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} in {output_dir}"
            )
    accelerator.wait_for_everyone()
    return checkpoint


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
