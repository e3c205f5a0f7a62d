"""ACE's losses: DINO global consistency between views, and matrix matching for composition/decomposition.

All losses compute in float32 whatever the autocast state: they end in softmaxes and logs of sharp
distributions (temperatures 0.04 to 0.1) where half precision loses the signal.

This file travels to the Hub with the model code: torch only.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Turn autocast off on `device`, so that matmuls run in the float32 their inputs were cast to."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class DinoLoss(nn.Module):
    """Cross-view DINO cross-entropy on the overlap-pooled head outputs (ACE's global consistency).

    The student's prediction for one view is pulled towards the teacher's sharpened distribution for the
    other view. Two things keep the teacher from collapsing: a low teacher temperature sharpens (prevents
    the uniform solution), and subtracting `center`, an EMA of the teacher outputs' batch mean, stops one
    dimension from dominating every image (prevents the one-hot solution).

    Args:
        out_dim: size of the head's output (prototypes), 65536 in ACE.
        student_temperature: softmax temperature of the student, 0.1.
        center_momentum: EMA momentum of the center, 0.9.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_large: torch.Tensor,
        student_small: torch.Tensor,
        teacher_large: torch.Tensor,
        teacher_small: torch.Tensor,
        teacher_temperature: float | torch.Tensor,
    ) -> torch.Tensor:
        """1/2 [CE(teacher(small), student(large)) + CE(teacher(large), student(small))], batch-averaged.

        Inputs are [B, out_dim] head outputs. The teacher temperature is an argument because it is
        scheduled (warmed up) by step; as a 0-dim tensor it spares torch.compile a recompilation for every new
        value. No gradient reaches the teacher inputs.
        """
        center = self.center.float()

        def teacher_probs(teacher: torch.Tensor) -> torch.Tensor:
            return F.softmax((teacher.detach().float() - center) / teacher_temperature, dim=-1)

        def cross_entropy(targets: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
            log_probs = F.log_softmax(student.float() / self.student_temperature, dim=-1)
            return -(targets * log_probs).sum(dim=-1).mean()

        return 0.5 * (
            cross_entropy(teacher_probs(teacher_small), student_large)
            + cross_entropy(teacher_probs(teacher_large), student_small)
        )

    @torch.no_grad()
    def update_center(self, teacher_outputs: torch.Tensor) -> None:
        """EMA update of the center with the batch mean of `teacher_outputs` [N, out_dim] (both views).

        Under torch.distributed the mean is over all processes' samples, so that every process keeps the
        same center (it is a buffer, not a parameter: nothing else would synchronize it).
        """
        outputs = teacher_outputs.detach().float()
        # Sum and sample count in one tensor: one all-reduce gives the count-weighted global mean.
        totals = torch.cat([outputs.sum(dim=0), outputs.new_tensor([outputs.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        batch_mean = totals[:-1] / totals[-1]
        self.center.mul_(self.center_momentum).add_(
            batch_mean.to(self.center.dtype), alpha=1 - self.center_momentum
        )


def alpha_weighted_bce(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Binary cross-entropy with logits against soft targets in [0, 1], averaged over all entries, float32.

    Correspondence targets are sparse: a row of the decomposition target has at most 25 non-zero entries
    out of 4n^2 (784 at n = 14). Unweighted BCE would be won by predicting "no match" everywhere, so each
    entry is weighted alpha * t + (1 - alpha) * (1 - t): matches get alpha, non-matches 1 - alpha.
    """
    logits, targets = logits.float(), targets.float()
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight)


class MatrixMatchingOutput(NamedTuple):
    """The matching loss and its hit rate: the share of rows that have a match whose most similar column is
    the target's peak (what the loss teaches, readable where the loss value is not: the best constant
    prediction already scores a low loss on these sparse targets)."""

    loss: torch.Tensor
    hit_rate: torch.Tensor


def peak_hit_rate(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of target rows with a match ([B, T, S], rows of zeros have none) whose argmax is the peak."""
    has_match = targets.amax(-1) > 0
    hits = (logits.argmax(-1) == targets.argmax(-1)) & has_match
    return hits.sum().float() / has_match.sum().clamp(min=1)


class MatrixMatchingLoss(nn.Module):
    """ACE's local consistency: token-to-token similarity matrix against a soft correspondence target.

    logits = teacher_tokens @ student_tokens^T / temperature, one row per teacher token, one column per
    student token, scored with `alpha_weighted_bce`. ACE uses it twice: decomposition (teacher small-view
    tokens vs. the student's up-sampled large-view sub-tokens, alpha 0.99) and composition (teacher
    large-view tokens vs. the student's down-sampled small-view tokens, alpha 0.9).

    Args:
        temperature: divides the dot products, 0.07 (a constant in ACE, not scheduled).
        alpha: weight of the matching entries, see `alpha_weighted_bce`.
    """

    def __init__(self, temperature: float = 0.07, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(
        self, teacher_tokens: torch.Tensor, student_tokens: torch.Tensor, targets: torch.Tensor
    ) -> MatrixMatchingOutput:
        """teacher_tokens [B, T, C], student_tokens [B, S, C], targets [B, T, S] -> scalar loss and hit rate.

        No gradient reaches the teacher tokens: the teacher is a moving average, never trained.
        """
        with _autocast_off(student_tokens.device):
            logits = teacher_tokens.detach().float() @ student_tokens.float().transpose(1, 2)
            loss = alpha_weighted_bce(logits / self.temperature, targets, self.alpha)
        return MatrixMatchingOutput(loss, peak_hit_rate(logits.detach(), targets))


__all__ = ["DinoLoss", "MatrixMatchingLoss", "MatrixMatchingOutput", "alpha_weighted_bce", "peak_hit_rate"]
