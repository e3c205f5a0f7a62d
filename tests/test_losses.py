"""ACE losses against hand-computed values (math.log / math.exp, not the torch functions under test)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ace_hf.losses_ace import DinoLoss, MatrixMatchingLoss, alpha_weighted_bce, peak_hit_rate

LN3 = math.log(3.0)


def test_alpha_weighted_bce_by_hand():
    logits = torch.tensor([[0.0, 2.0, LN3]])
    targets = torch.tensor([[1.0, 0.0, 0.25]])
    # BCE(x, t) = -[t log s(x) + (1 - t) log(1 - s(x))]; weight = 0.9 t + 0.1 (1 - t).
    match = 0.9 * math.log(2.0)  # s(0) = 1/2
    non_match = 0.1 * math.log(1.0 + math.exp(2.0))  # -log(1 - s(2))
    soft = 0.3 * -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))  # s(ln 3) = 3/4
    expected = (match + non_match + soft) / 3
    loss = alpha_weighted_bce(logits, targets, alpha=0.9)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_weighted_bce_is_float32_for_half_inputs():
    loss = alpha_weighted_bce(
        torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), 0.5
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * math.log(2.0))


def dino_case() -> dict[str, torch.Tensor]:
    """Two samples, two prototypes; with student temperature 0.1 and teacher temperature 1.0."""
    return {
        "student_large": torch.tensor([[0.0, 0.0], [0.1 * LN3, 0.0]]),  # /0.1 -> [1/2, 1/2], [3/4, 1/4]
        "student_small": torch.tensor([[0.1 * LN3, 0.0], [0.0, 0.0]]),
        "teacher_large": torch.tensor([[0.0, 0.0], [LN3, 0.0]]),  # /1.0 -> [1/2, 1/2], [3/4, 1/4]
        "teacher_small": torch.tensor([[LN3, 0.0], [0.0, 0.0]]),
    }


def cross_entropy(p: list[float], q: list[float]) -> float:
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))


def test_dino_loss_by_hand():
    loss = DinoLoss(out_dim=2, student_temperature=0.1)(**dino_case(), teacher_temperature=1.0)
    half, skewed = [0.5, 0.5], [0.75, 0.25]
    # CE(teacher(small), student(large)): sample 0 teacher skewed vs student half; sample 1 half vs skewed.
    small_to_large = (cross_entropy(skewed, half) + cross_entropy(half, skewed)) / 2
    # CE(teacher(large), student(small)): sample 0 half vs skewed; sample 1 skewed vs half.
    large_to_small = (cross_entropy(half, skewed) + cross_entropy(skewed, half)) / 2
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((small_to_large + large_to_small) / 2, rel=1e-6)


def test_dino_teacher_temperature_sharpens():
    # Teacher temperature 0.5 doubles the teacher's logits: [2 ln 3, 0] -> probabilities [9/10, 1/10].
    case = {name: values[:1] for name, values in dino_case().items()}
    loss = DinoLoss(out_dim=2, student_temperature=0.1)(**case, teacher_temperature=0.5)
    expected = (cross_entropy([0.9, 0.1], [0.5, 0.5]) + cross_entropy([0.5, 0.5], [0.75, 0.25])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_center_is_subtracted_from_the_teacher():
    criterion = DinoLoss(out_dim=2, student_temperature=0.1)
    criterion.center.copy_(torch.tensor([[LN3, 0.0]]))
    case = {name: values[:1] for name, values in dino_case().items()}
    # Centered teacher logits: small [ln 3, 0] -> [0, 0] (uniform); large [0, 0] -> [-ln 3, 0] -> [1/4, 3/4].
    expected = (cross_entropy([0.5, 0.5], [0.5, 0.5]) + cross_entropy([0.25, 0.75], [0.75, 0.25])) / 2
    assert criterion(**case, teacher_temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_dino_update_center_is_an_ema_of_the_batch_mean():
    criterion = DinoLoss(out_dim=2, center_momentum=0.9)
    criterion.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # mean [2, 3]
    torch.testing.assert_close(criterion.center, torch.tensor([[0.2, 0.3]]))
    criterion.update_center(torch.zeros(4, 2))
    torch.testing.assert_close(criterion.center, torch.tensor([[0.18, 0.27]]))


def test_dino_update_center_under_a_single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        criterion = DinoLoss(out_dim=2, center_momentum=0.5)
        criterion.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        torch.testing.assert_close(criterion.center, torch.tensor([[1.0, 1.5]]))
    finally:
        dist.destroy_process_group()


def test_dino_gradient_reaches_the_student_only():
    inputs = {name: values.clone().requires_grad_() for name, values in dino_case().items()}
    DinoLoss(out_dim=2)(**inputs, teacher_temperature=0.04).backward()
    for name in ("student_large", "student_small"):
        assert inputs[name].grad is not None and inputs[name].grad.abs().sum() > 0
    for name in ("teacher_large", "teacher_small"):
        assert inputs[name].grad is None


def test_dino_loss_is_float32_under_autocast():
    inputs = {name: values.to(torch.bfloat16) for name, values in dino_case().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DinoLoss(out_dim=2)(**inputs, teacher_temperature=0.04)
    assert loss.dtype == torch.float32


def test_matrix_matching_scales_the_dot_products():
    teacher = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # [B=1, T=2, C=3]
    student = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # S=4
    targets = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.0, 0.0]]])
    criterion = MatrixMatchingLoss(temperature=0.5, alpha=0.99)
    expected_logits = torch.tensor([[[2.0, 0.0, -2.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])  # dot products / 0.5
    loss, hit_rate = criterion(teacher, student, targets)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, alpha_weighted_bce(expected_logits, targets, alpha=0.99))
    # Row 0's best column (0) is its peak; row 1's best column (1) is its peak too.
    assert hit_rate.item() == 1.0


def test_matrix_matching_gradient_and_precision():
    teacher = torch.randn(2, 4, 8, requires_grad=True)
    student = torch.randn(2, 16, 8, requires_grad=True)
    targets = torch.rand(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MatrixMatchingLoss()(teacher, student, targets).loss
    # The logits matmul escapes autocast: in bfloat16 this loss would be off by about 2e-3 (relative).
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, MatrixMatchingLoss()(teacher, student, targets).loss, rtol=1e-6, atol=0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_matrix_matching_rejects_mismatched_targets():
    with pytest.raises(ValueError):
        MatrixMatchingLoss()(torch.randn(1, 4, 8), torch.randn(1, 16, 8), torch.rand(1, 16, 4))


def test_peak_hit_rate_counts_rows_with_a_match_only():
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 1.0, 3.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    targets = torch.tensor([[[1.0, 0.6, 0.0], [0.0, 1.0, 0.6], [0.0, 0.0, 0.0], [0.0, 0.6, 1.0]]])
    # Rows 0 and 3 hit their peak, row 1 misses it (argmax 2, peak 1), row 2 has no match: 2 of 3.
    assert peak_hit_rate(logits, targets).item() == pytest.approx(2 / 3)
