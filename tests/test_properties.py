"""Property-based tests (hypothesis): the view geometry for any valid configuration and origins."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ace_hf.correspondence_ace import correspondence_targets, sample_view_origins


@st.composite
def view_geometries(draw) -> tuple[int, torch.Tensor]:
    """A valid (view_tokens, origins [B, 4]) pair: any even token grid, any grid that holds the large view,
    any overlap requirement, any seed."""
    n = draw(st.integers(1, 8)) * 2
    grid_size = draw(st.integers(2 * n, 2 * n + 24))
    min_overlap = draw(st.floats(0.01, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    try:
        origins = sample_view_origins(4, grid_size, n, min_overlap, torch.Generator().manual_seed(seed), 200)
    except RuntimeError:  # an overlap this grid cannot reach: the sampler says so instead of looping
        origins = sample_view_origins(4, grid_size, n, 0.01, torch.Generator().manual_seed(seed))
    return n, origins


@settings(max_examples=60, deadline=None)
@given(view_geometries())
def test_every_target_pair_covers_the_same_image_cells(geometry: tuple[int, torch.Tensor]) -> None:
    """Each target's peak joins tokens over the same cells, and a token has a target exactly when the cells
    under it lie in the other view."""
    n, origins = geometry
    targets = correspondence_targets(origins, n)
    grid = int(origins.max()) + 2 * n
    cell_ids = torch.arange(grid * grid).view(grid, grid)
    for b, (R1, C1, R2, C2) in enumerate(origins.tolist()):
        large = cell_ids[R1 : R1 + 2 * n, C1 : C1 + 2 * n]
        small = cell_ids[R2 : R2 + n, C2 : C2 + n].flatten()
        in_large = torch.isin(small, large.flatten())
        assert torch.equal(targets.overlap_small[b], in_large)
        peaks = targets.decomposition[b].argmax(dim=1)
        assert torch.equal(large.flatten()[peaks][in_large], small[in_large])

        large_blocks = large.unfold(0, 2, 2).unfold(1, 2, 2).reshape(n * n, 4)
        small_blocks = small.view(n, n).unfold(0, 2, 2).unfold(1, 2, 2).reshape(n * n // 4, 4)
        has_block = (large_blocks.unsqueeze(1) == small_blocks.unsqueeze(0)).all(-1)  # [n*n, n*n/4]
        assert torch.equal(targets.overlap_large[b], has_block.any(1))
        peaks = targets.composition[b].argmax(dim=1)
        covered = targets.overlap_large[b]
        assert torch.equal(small_blocks[peaks][covered], large_blocks[covered])
