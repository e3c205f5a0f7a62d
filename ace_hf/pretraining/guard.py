"""Guards of a pretraining run: non-finite losses and stop requests (checked on a sync cadence, on every process
at once), and replicas that drift apart."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..modeling_ace import AceForPreTraining
from .checkpoints import whole_tensor

logger = get_logger(__name__)


@contextmanager
def graceful_stop() -> Iterator[dict[str, bool]]:
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
