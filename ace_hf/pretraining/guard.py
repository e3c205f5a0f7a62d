"""Guards of a pretraining run: non-finite losses (checked on a sync cadence, on every process at once), stop
requests (acted on at the next step, or with several processes at the next check, where they all agree), and
replicas that drift apart."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..modeling_ace import AceForPreTraining
from .checkpoints import whole_tensor

logger = get_logger(__name__)


# A second signal this soon after the first is the launcher passing the same request on (`accelerate launch` and
# torchrun signal their workers, which the terminal's Ctrl-C already reached), not the user insisting.
RELAYED_SIGNAL_S = 2.0


@dataclass(frozen=True)
class CheckSchedule:
    """The steps at which every process checks the guards together (one all-reduce, one host sync): every
    `sync_steps`, before each checkpoint and at the last step."""

    sync_steps: int
    checkpointing_steps: int
    total_steps: int

    def is_check(self, step: int) -> bool:
        checkpoint = self.checkpointing_steps and step % self.checkpointing_steps == 0
        return step % self.sync_steps == 0 or bool(checkpoint) or step == self.total_steps

    def next_check(self, step: int) -> int:
        """The first check step after `step` (the last step at the latest)."""
        return next(
            (later for later in range(step + 1, self.total_steps) if self.is_check(later)), self.total_steps
        )


@dataclass
class StopRequest:
    """The step after which a Ctrl-C or SIGTERM stops the run (None: not requested), and when it was asked."""

    step: int | None = None
    asked_at: float = 0.0

    def due(self, step: int) -> bool:
        return self.step is not None and step >= self.step


@contextmanager
def graceful_stop(stop_step: Callable[[], int]) -> Iterator[StopRequest]:
    """Ctrl-C or SIGTERM asks the loop to stop after the step `stop_step()` names when the signal comes (the first
    one every process can agree on), save a checkpoint there and exit; a second one aborts."""
    request = StopRequest()

    def handler(signum: int, frame) -> None:
        if request.step is not None:
            if time.monotonic() - request.asked_at < RELAYED_SIGNAL_S:
                return
            raise KeyboardInterrupt
        request.step, request.asked_at = stop_step(), time.monotonic()
        logger.warning(
            f"Stop requested: stopping after step {request.step} with a checkpoint there (continue with "
            "--resume_from_checkpoint latest; signal again to abort at once)."
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
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
        """Raise on any process's non-finite loss, on every process; return whether any process asked to stop
        at this step (`stop_requested`: whether this one did)."""
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
    processes = accelerator.num_processes
    logger.info(
        f"Every process holds the same student and teacher weights ({processes} process{'es' * (processes > 1)})."
    )
