"""Checkpoints of a pretraining run: atomic writes, resolving 'latest', rotation, and whole weights under FSDP.

A checkpoint is `accelerator.save_state` plus the run record (`ace_hf.runs`), written into a temporary folder
and renamed, so a crash mid-save never leaves half a checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType

from ..configuration_ace import AceConfig
from ..modeling_ace import AceForPreTraining
from ..runs import RunMismatchError, write_run_record

logger = get_logger(__name__)
CHECKPOINT_PREFIX = "step_"


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
    checkpoint = Path(resume_from)  # an existing folder: PretrainingArguments checks it
    if checkpoint.resolve().parent == (output_dir / "checkpoints").resolve():
        step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
        if newer := [path.name for path in found if int(path.name.removeprefix(CHECKPOINT_PREFIX)) > step]:
            raise RunMismatchError(
                f"{output_dir} holds checkpoints newer than {checkpoint.name} ({', '.join(newer)}): move them "
                "out of the folder to go back to this one, or resume from 'latest'."
            )
    return checkpoint


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
