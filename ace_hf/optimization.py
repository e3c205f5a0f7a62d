"""ACE's optimization (DINO's): step-indexed schedules, weight-decay parameter groups, last-layer freeze.

Every schedule is a pure function of the optimizer step, so resuming from a checkpoint only needs the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Parameter-group key that marks the groups the weight-decay schedule applies to.
WEIGHT_DECAY_FLAG = "apply_weight_decay"


def cosine_schedule(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then cosine from `start` to `end`.

    The value reaches `end` at `total_steps` and stays there for later steps.
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
    if step >= total_steps:
        return end
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """ACE's (and DINO's) linear scaling rule: the base rate is quoted for a global batch of 256."""
    return base_lr * global_batch_size / 256


@dataclass(frozen=True, kw_only=True)
class AceSchedules:
    """ACE's schedules, indexed by optimizer step; built from a run's recipe
    (`ace_hf.pretraining.recipe.PretrainingRecipe.schedules`), which holds the values.

    Epoch counts are converted to steps with `steps_per_epoch`. `learning_rate` is the already-scaled peak
    rate (see `scaled_learning_rate`).
    """

    total_steps: int
    steps_per_epoch: int
    learning_rate: float
    min_learning_rate: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    teacher_momentum: float
    teacher_momentum_end: float
    teacher_temperature: float
    warmup_teacher_temperature: float
    warmup_teacher_temperature_epochs: float
    freeze_last_layer_epochs: float

    def __post_init__(self) -> None:
        if self.total_steps <= 0 or self.steps_per_epoch <= 0:
            raise ValueError("total_steps and steps_per_epoch must be positive")
        if self.warmup_epochs * self.steps_per_epoch > self.total_steps:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} is longer than the whole run")

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up from 0 over `warmup_epochs`, then cosine down to `min_learning_rate`."""
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        return cosine_schedule(
            step, self.total_steps, self.learning_rate, self.min_learning_rate, warmup_steps=warmup_steps
        )

    def weight_decay_at(self, step: int) -> float:
        """Cosine increase of weight decay (0.04 -> 0.4): weak regularization early, strong late."""
        return cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def teacher_momentum_at(self, step: int) -> float:
        """Cosine increase of the teacher EMA momentum to 1: the teacher settles as training ends."""
        return cosine_schedule(step, self.total_steps, self.teacher_momentum, self.teacher_momentum_end)

    def teacher_temperature_at(self, step: int) -> float:
        """Linear warm-up from `warmup_teacher_temperature`, then constant `teacher_temperature`."""
        warmup_steps = self.warmup_teacher_temperature_epochs * self.steps_per_epoch
        if step >= warmup_steps:
            return self.teacher_temperature
        fraction = step / warmup_steps
        return (
            self.warmup_teacher_temperature
            + (self.teacher_temperature - self.warmup_teacher_temperature) * fraction
        )

    def last_layer_frozen(self, step: int) -> bool:
        """Whether the global head's last layer is still frozen (its first `freeze_last_layer_epochs`)."""
        return step < self.freeze_last_layer_epochs * self.steps_per_epoch

    def apply_to_optimizer(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set this step's learning rate on every group, and its weight decay on the groups flagged for it.

        Groups are flagged by `parameter_groups` (key `WEIGHT_DECAY_FLAG`); unflagged groups keep theirs.
        """
        learning_rate, weight_decay = self.learning_rate_at(step), self.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
            if group.get(WEIGHT_DECAY_FLAG, False):
                group["weight_decay"] = weight_decay


def parameter_groups(model: nn.Module) -> list[dict]:
    """Split the trainable parameters into a weight-decay group and a no-decay group (DINO's rule).

    Biases and all parameters with ndim <= 1 (norm weights and biases) are not decayed: shrinking them
    towards 0 only fights the normalization. Frozen parameters are left out; empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [
        {"params": decay, WEIGHT_DECAY_FLAG: True},
        {"params": no_decay, "weight_decay": 0.0, WEIGHT_DECAY_FLAG: False},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, learning_rate: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, fused where torch has the kernel: it updates every tensor in one pass
    (about 6x faster than the foreach update on the project's CPU; the standard choice on CUDA)."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(parameter_groups(model), lr=learning_rate, fused=fused)


def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create now the AdamW state (step 0, zero moments) that AdamW would create at each parameter's first update.

    The last layer gets no update during its freeze, so without this a checkpoint written in the first epoch has
    no state for it, and a sharded (FSDP) checkpoint cannot be loaded: torch.distributed.checkpoint expects the
    state of every parameter. AdamW only fills in missing state, so the updates stay bit-identical (tested).
    Call it after `accelerator.prepare`, which may replace the parameters (FSDP shards them).
    """
    for group in optimizer.param_groups:
        # Where and how AdamW keeps `step` (torch/optim/adam.py, optimizer.py's _get_scalar_dtype).
        on_device = group["fused"] or group["capturable"]
        double = not group["fused"] and torch.get_default_dtype() == torch.float64
        step_dtype = torch.float64 if double else torch.float32
        for parameter in group["params"]:
            if optimizer.state[parameter]:
                continue
            state = {
                "step": torch.zeros((), dtype=step_dtype, device=parameter.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
            }
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            optimizer.state[parameter] = state


def cancel_last_layer_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Drop the gradients of `parameters` (the global head's last layer) after backward, before the step.

    DINO freezes the last layer during the first epoch because updating it while the prototypes are still
    random makes training unstable. Setting `.grad = None` rather than toggling `requires_grad` keeps DDP's
    bookkeeping intact, and rather than zeroing it makes AdamW skip the parameters entirely (no momentum,
    no weight decay).
    """
    for parameter in parameters:
        parameter.grad = None


__all__ = [
    "WEIGHT_DECAY_FLAG",
    "AceSchedules",
    "cancel_last_layer_gradients",
    "cosine_schedule",
    "initialize_optimizer_state",
    "make_optimizer",
    "parameter_groups",
    "scaled_learning_rate",
]
