"""CUDA-only checks (marker `gpu`, skipped without a GPU): the numerics a CPU test suite cannot see.

bf16 autocast training against float32, CUDA against CPU outputs, SDPA kernels against eager attention, and
the EMA teacher keeping float32 weights under autocast (in bf16 its (1 - 0.996) updates would round away).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from ace_hf import AceForPreTraining, AceModel
from ace_hf.optimization import parameter_groups
from benchmarks.bench_pretraining import synthetic_batch
from tests.conftest import tiny_swin_config, tiny_vit_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = torch.device("cuda")
CONFIGS = [pytest.param(tiny_vit_config, id="vit"), pytest.param(tiny_swin_config, id="swin")]


@pytest.fixture
def true_float32() -> Iterator[None]:
    """Float32 on CUDA means TF32 for cuDNN convolutions by default (10-bit mantissa): off for 1e-4 checks."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def bf16_autocast() -> torch.autocast:
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_bf16_autocast_step_is_finite_and_matches_float32(make_config, true_float32) -> None:
    config = make_config()
    model = AceForPreTraining(config).to(DEVICE).train()
    reference = copy.deepcopy(model)  # same weights, BatchNorm statistics and DINO center
    batch = synthetic_batch(config, 4, DEVICE)

    float32_loss = reference(**batch).loss.detach()
    with bf16_autocast():
        output = model(**batch)
    output.loss.backward()

    for name in ("loss", "global_loss", "local_loss", "decomposition_loss", "composition_loss"):
        assert torch.isfinite(getattr(output, name)), name
    grads = [param.grad for param in model.parameters() if param.requires_grad]
    assert all(grad is not None and grad.dtype == torch.float32 for grad in grads)
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); a few layers and sharp softmaxes stay within 2%.
    torch.testing.assert_close(output.loss.float().detach(), float32_loss, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make_config", CONFIGS)
def test_cuda_outputs_match_cpu(make_config, true_float32) -> None:
    model = AceModel(make_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixels)
        actual = copy.deepcopy(model).to(DEVICE)(pixels.to(DEVICE))
    for name in ("last_hidden_state", "pooler_output", "patch_embeddings"):
        torch.testing.assert_close(getattr(actual, name).cpu(), getattr(expected, name), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make_config", CONFIGS)
@pytest.mark.parametrize(("use_bf16", "tolerance"), [(False, 1e-4), (True, 5e-2)], ids=["float32", "bf16"])
def test_sdpa_matches_eager_on_cuda(make_config, use_bf16: bool, tolerance: float, true_float32) -> None:
    model = AceModel(make_config()).to(DEVICE).eval()
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)

    def encode(implementation: str) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(pixels).last_hidden_state.float()

    sdpa, eager = encode("sdpa"), encode("eager")
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa, eager, atol=tolerance, rtol=tolerance)


def test_teacher_ema_stays_float32_and_moves_under_bf16_autocast() -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config).to(DEVICE).train()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-4)
    with bf16_autocast():
        loss = model(**synthetic_batch(config, 4, DEVICE)).loss
    loss.backward()
    optimizer.step()
    before = [param.detach().clone() for param in model.teacher.parameters()]
    momentum = config.teacher_momentum  # the schedule's start: its largest update
    with bf16_autocast():  # stricter than the training loop, which updates outside autocast
        model.update_teacher(momentum)

    after = list(model.teacher.parameters())
    assert all(param.dtype == torch.float32 for param in after)
    moved = sum(not torch.equal(new, old) for new, old in zip(after, before, strict=True))
    assert moved >= 0.9 * len(after), f"only {moved} of {len(after)} teacher tensors moved"
    # Each step is ~(1 - 0.996) * lr: far below bf16's spacing near these weights, kept exactly in float32.
    for new, old, student in zip(after, before, model.student.parameters(), strict=True):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * student.detach())
