"""Correspondence targets: the vectorized version against the loop reference, hand values, and cell identity."""

from __future__ import annotations

import math

import pytest
import torch

from ace_hf.correspondence_ace import correspondence_targets, sample_view_origins
from benchmarks.loop_targets import loop_correspondence_targets

GAUSSIAN_5 = sum(math.exp(-(d * d) / 2) for d in range(-2, 3)) ** 2  # full 5 x 5 window, sigma 1
GAUSSIAN_3 = sum(math.exp(-(d * d) / 2) for d in range(-1, 2)) ** 2  # full 3 x 3 window

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_matches_loop(origins: torch.Tensor, view_tokens: int) -> None:
    fast = correspondence_targets(origins, view_tokens)
    overlap_large, overlap_small, decomposition, composition = loop_correspondence_targets(
        origins, view_tokens
    )
    assert torch.equal(fast.overlap_large, overlap_large)
    assert torch.equal(fast.overlap_small, overlap_small)
    torch.testing.assert_close(fast.decomposition, decomposition)
    torch.testing.assert_close(fast.composition, composition)


@pytest.mark.parametrize(
    ("grid_size", "view_tokens", "min_overlap", "batch_size"),
    [
        (32, 14, 0.5, 8),  # ACE defaults
        (20, 8, 0.05, 32),  # tiny-preset geometry, barely overlapping pairs
        (40, 6, 0.05, 32),  # large offsets on a big grid, partial overlaps
        (30, 4, 0.05, 32),
        (16, 8, 0.05, 16),  # the large view fills the image: always full overlap
    ],
)
def test_matches_loop_reference_on_random_origins(grid_size, view_tokens, min_overlap, batch_size):
    generator = torch.Generator().manual_seed(grid_size * 100 + view_tokens)
    origins = sample_view_origins(batch_size, grid_size, view_tokens, min_overlap, generator=generator)
    assert_matches_loop(origins, view_tokens)


def test_matches_loop_reference_when_row_and_column_offsets_differ():
    # (R1, C1, R2, C2): the published code's transposed masks are wrong exactly on such pairs.
    origins = torch.tensor(
        [[0, 0, 2, 6], [4, 2, 0, 14], [6, 2, 0, 4], [1, 3, 13, 5], [2, 8, 8, 0], [0, 10, 10, 0]]
    )
    assert_matches_loop(origins, view_tokens=8)


def test_hand_checked_values():
    # n = 4: the large view covers cells [0, 8) x [0, 8), the small view cells [2, 6) x [4, 8).
    targets = correspondence_targets(torch.tensor([[0, 0, 2, 4]]), view_tokens=4)
    decomposition, composition = targets.decomposition[0], targets.composition[0]
    assert decomposition.shape == (16, 64) and composition.shape == (16, 4)

    # Small token (0, 0) is cell (2, 4): sub-token (2, 4) of the 8 x 8 sub-token grid, index 2 * 8 + 4.
    row = decomposition[0]
    assert row.argmax().item() == 20 and row[20].item() == 1.0
    assert row[21].item() == pytest.approx(math.exp(-0.5))  # (2, 5)
    assert row[29].item() == pytest.approx(math.exp(-1.0))  # (3, 5)
    assert row[36].item() == pytest.approx(math.exp(-2.0))  # (4, 4)
    assert row[23].item() == 0.0  # (2, 7): three columns away, outside the 5 x 5 window
    # Small token (0, 3) is cell (2, 7) on the right border: the window is clipped to 5 x 3.
    clipped = sum(math.exp(-(dr * dr + dc * dc) / 2) for dr in range(-2, 3) for dc in range(-2, 1))
    assert decomposition[3].sum().item() == pytest.approx(clipped)
    assert targets.overlap_small.all()

    # Large token (r, c) sits at pooled small position (r - 1, c - 2): inside for r in {1, 2}, c in {2, 3}.
    assert targets.overlap_large[0].nonzero().flatten().tolist() == [6, 7, 10, 11]
    assert composition[6].tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-1.0)])
    assert composition[11].tolist() == pytest.approx([math.exp(-1.0), math.exp(-0.5), math.exp(-0.5), 1.0])


def test_matched_tokens_see_the_same_cells():
    """Cut both views out of an image whose cells carry their own ids, and follow each target's peak."""
    n, grid_size = 6, 20
    cell_ids = torch.arange(grid_size * grid_size).view(grid_size, grid_size)
    origins = sample_view_origins(16, grid_size, n, 0.05, generator=torch.Generator().manual_seed(1))
    targets = correspondence_targets(origins, n)
    for b, (R1, C1, R2, C2) in enumerate(origins.tolist()):
        large_cells = cell_ids[R1 : R1 + 2 * n, C1 : C1 + 2 * n]  # one sub-token per cell, row-major
        small_cells = cell_ids[R2 : R2 + n, C2 : C2 + n]  # one token per cell, row-major
        for token in targets.overlap_small[b].nonzero().flatten().tolist():
            peak = targets.decomposition[b, token].argmax().item()
            assert large_cells.flatten()[peak] == small_cells.flatten()[token]
        # A large token covers 2 x 2 cells; its peak is the 2 x 2 block of small tokens over the same cells.
        large_blocks = large_cells.unfold(0, 2, 2).unfold(1, 2, 2).reshape(n * n, 4)
        small_blocks = small_cells.unfold(0, 2, 2).unfold(1, 2, 2).reshape(n * n // 4, 4)
        for token in targets.overlap_large[b].nonzero().flatten().tolist():
            peak = targets.composition[b, token].argmax().item()
            assert torch.equal(large_blocks[token], small_blocks[peak])


def test_overlap_masks_are_the_rows_with_a_target():
    origins = sample_view_origins(32, 24, 8, 0.05, generator=torch.Generator().manual_seed(2))
    targets = correspondence_targets(origins, 8)
    assert not targets.overlap_small.all() and not targets.overlap_large.all()  # partial overlaps occur
    assert torch.equal(targets.overlap_small, targets.decomposition.sum(-1) > 0)
    assert torch.equal(targets.overlap_large, targets.composition.sum(-1) > 0)


def test_interior_rows_sum_to_the_full_window():
    # n = 6, identical origins: small token (0, 0) -> sub-token (0, 0) (corner); small token (2, 2) ->
    # sub-token (2, 2) (interior); large token (1, 1) -> pooled (1, 1), the centre of the 3 x 3 pooled grid.
    targets = correspondence_targets(torch.tensor([[0, 0, 0, 0]]), view_tokens=6)
    assert targets.decomposition[0, 2 * 6 + 2].sum().item() == pytest.approx(GAUSSIAN_5)
    corner = sum(math.exp(-(dr * dr + dc * dc) / 2) for dr in range(3) for dc in range(3))
    assert targets.decomposition[0, 0].sum().item() == pytest.approx(corner)
    assert targets.composition[0, 1 * 6 + 1].sum().item() == pytest.approx(GAUSSIAN_3)


@pytest.mark.parametrize("origin", [[0, 0, 1, 0], [0, 0, 0, 1], [3, 2, 4, 2]])
def test_parity_violation_raises(origin):
    with pytest.raises(ValueError, match="parity"):
        correspondence_targets(torch.tensor([origin]), view_tokens=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_and_dtype(device, dtype):
    origins = torch.tensor([[0, 0, 2, 4], [2, 0, 0, 6]])
    targets = correspondence_targets(origins.to(device), view_tokens=4, dtype=dtype)
    for mask in (targets.overlap_large, targets.overlap_small):
        assert mask.dtype == torch.bool and mask.device.type == device
    for target in (targets.decomposition, targets.composition):
        assert target.dtype == dtype and target.device.type == device
    reference = loop_correspondence_targets(origins, view_tokens=4)
    torch.testing.assert_close(targets.decomposition.cpu().float(), reference[2], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(targets.composition.cpu().float(), reference[3], atol=1e-2, rtol=1e-2)


def test_sampled_origins_respect_grid_parity_and_overlap():
    n, grid_size, min_overlap = 8, 24, 0.3
    origins = sample_view_origins(64, grid_size, n, min_overlap, generator=torch.Generator().manual_seed(3))
    R1, C1, R2, C2 = origins.T
    assert (origins >= 0).all() and (R1 + 2 * n <= grid_size).all() and (C1 + 2 * n <= grid_size).all()
    assert (R2 + n <= grid_size).all() and (C2 + n <= grid_size).all()
    assert ((R1 - R2) % 2 == 0).all() and ((C1 - C2) % 2 == 0).all()
    overlap = loop_correspondence_targets(origins, n)[1].float().mean(dim=1)
    assert (overlap >= min_overlap).all()
    again = sample_view_origins(64, grid_size, n, min_overlap, generator=torch.Generator().manual_seed(3))
    assert torch.equal(origins, again)
