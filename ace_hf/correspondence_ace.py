"""Geometry of ACE's grid-wise two-view crop: where the views sit, and which tokens correspond.

Everything is in image-cell coordinates (row, col) of the jittered image's `grid_size x grid_size` grid.
A view origin is the top-left cell of a view. The large view covers `2n x 2n` cells and is shown to the
model at half resolution (one token = 2 x 2 cells); the small view covers `n x n` cells (one token = one
cell). Tokens are numbered row-major (`row * n + col`), exactly like the backbone's patch sequence.

This file travels to the Hub with the model code: torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARITY_ERROR = "view_origins: the small view's origin must have the large view's parity on each axis"
# Gaussian window radii of the soft targets (5 x 5 for decomposition, 3 x 3 for composition).
DECOMPOSITION_RADIUS = 2
COMPOSITION_RADIUS = 1


@dataclass
class CorrespondenceTargets:
    """Overlap masks and soft correspondence targets for a batch of view pairs.

    Attributes:
        overlap_large: bool [B, n*n], large-view tokens whose 2 x 2 cells lie inside the small view.
        overlap_small: bool [B, n*n], small-view tokens whose cell lies inside the large view.
        decomposition: [B, n*n, 4*n*n], rows = small-view tokens, columns = the large view's sub-tokens
            (its tokens split 2 x 2, a `2n x 2n` grid, one sub-token per cell).
        composition: [B, n*n, n*n/4], rows = large-view tokens, columns = small-view tokens pooled 2 x 2.
    """

    overlap_large: torch.Tensor
    overlap_small: torch.Tensor
    decomposition: torch.Tensor
    composition: torch.Tensor


def _gaussian_rows(centers: torch.Tensor, side: int, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """1-D Gaussian (sigma 1, peak 1) around each center on a line of `side` cells, cut to |d| <= radius.

    centers: [B, T] integer positions (may lie outside the line); returns [B, T, side].
    """
    positions = torch.arange(side, device=centers.device)
    distance = positions.view(1, 1, side) - centers.unsqueeze(-1)
    weights = torch.exp(-0.5 * distance.to(dtype) ** 2)
    return weights * (distance.abs() <= radius).to(dtype)


def _gaussian_targets(
    center_rows: torch.Tensor, center_cols: torch.Tensor, side: int, radius: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D separable Gaussian targets on a `side x side` grid and the mask of rows whose center is on it.

    A 2-D Gaussian with sigma 1 is the outer product of two 1-D ones; rows whose center falls outside the
    grid are zeroed (their token has no partner in the other view).
    """
    inside = (center_rows >= 0) & (center_rows < side) & (center_cols >= 0) & (center_cols < side)
    rows = _gaussian_rows(center_rows, side, radius, dtype)
    cols = _gaussian_rows(center_cols, side, radius, dtype)
    targets = (rows.unsqueeze(-1) * cols.unsqueeze(-2)).flatten(2)  # [B, T, side * side]
    return targets.mul_(inside.unsqueeze(-1).to(dtype)), inside


def correspondence_targets(
    view_origins: torch.Tensor, view_tokens: int, dtype: torch.dtype = torch.float32
) -> CorrespondenceTargets:
    """Overlap masks and decomposition / composition targets from the crop origins, vectorized over the batch.

    Args:
        view_origins: integer [B, 4] = (large row, large col, small row, small col) in grid cells, on the
            device where the loss runs. The small origin must have the large origin's parity on each axis.
        view_tokens: n, the token grid side of each view (even).
        dtype: floating dtype of the targets.
    """
    if view_origins.ndim != 2 or view_origins.shape[1] != 4:
        raise ValueError(f"view_origins must have shape [B, 4], got {tuple(view_origins.shape)}")
    if view_tokens <= 0 or view_tokens % 2:
        raise ValueError(f"view_tokens must be a positive even number, got {view_tokens}")
    origins = view_origins.long()
    large_origin, small_origin = origins[:, :2], origins[:, 2:]
    offset = small_origin - large_origin  # [B, 2]: small origin in large-view cells
    aligned = ((offset % 2) == 0).all()
    if origins.device.type == "cpu" and not torch.compiler.is_compiling():
        if not aligned:
            raise ValueError(PARITY_ERROR)
    else:  # checked on the device: no host sync (or graph break) in every training step
        torch._assert_async(aligned, PARITY_ERROR)

    n = view_tokens
    token_index = torch.arange(n * n, device=origins.device)
    token_row, token_col = (token_index // n).unsqueeze(0), (token_index % n).unsqueeze(0)  # [1, n*n]

    # Decomposition: small-view token (r, c) sits on cell (R2 + r, C2 + c) = sub-token (r + dR, c + dC).
    decomposition, overlap_small = _gaussian_targets(
        token_row + offset[:, :1], token_col + offset[:, 1:], 2 * n, DECOMPOSITION_RADIUS, dtype
    )
    # Composition: large-view token (r, c) starts at cell (R1 + 2r, C1 + 2c); in the small view pooled 2 x 2
    # that is position ((2r - dR) / 2, (2c - dC) / 2), an integer thanks to the parity rule.
    composition, overlap_large = _gaussian_targets(
        token_row - offset[:, :1] // 2, token_col - offset[:, 1:] // 2, n // 2, COMPOSITION_RADIUS, dtype
    )
    return CorrespondenceTargets(
        overlap_large=overlap_large,
        overlap_small=overlap_small,
        decomposition=decomposition,
        composition=composition,
    )


def view_geometry_problems(grid_size: int, view_tokens: int, min_overlap: float) -> list[tuple[str, str]]:
    """(field, why) for each view setting that cannot produce ACE view pairs.

    Shared by AceConfig and AceImageProcessor validation, so both reject the same settings in the same words.
    """
    problems = []
    if view_tokens % 2:
        problems.append(("view_tokens", "must be even (composition pools 2 x 2 small-view tokens)"))
    if grid_size < 2 * view_tokens:
        problems.append(
            ("grid_size", f"must be at least 2 * view_tokens = {2 * view_tokens} to hold the large view")
        )
    if not 0.0 < min_overlap <= 1.0:
        problems.append(("min_overlap", "must be in (0, 1]"))
    return problems


def _overlap_fraction(
    large_origin: torch.Tensor, small_origin: torch.Tensor, view_tokens: int
) -> torch.Tensor:
    """Fraction of the small view's cells that lie inside the large view; origins are [B, 2]."""
    n = view_tokens
    start = torch.maximum(large_origin, small_origin)
    stop = torch.minimum(large_origin + 2 * n, small_origin + n)
    extent = (stop - start).clamp(min=0)
    return extent.prod(dim=1).float() / (n * n)


def sample_view_origins(
    batch_size: int,
    grid_size: int,
    view_tokens: int,
    min_overlap: float,
    generator: torch.Generator | None = None,
    max_rounds: int = 1000,
) -> torch.Tensor:
    """Draw random view-pair origins on a `grid_size` grid: LongTensor [B, 4] (R1, C1, R2, C2) in cells.

    Both views lie inside the grid, the small origin has the large origin's parity on each axis (so every
    2 x 2 block of small-view tokens falls under one large-view token), and pairs whose overlap is below
    `min_overlap` of the small view are redrawn.
    """
    n = view_tokens
    if grid_size < 2 * n:
        raise ValueError(
            f"grid_size={grid_size} cannot hold the large view of 2 * view_tokens = {2 * n} cells"
        )
    origins = torch.empty(batch_size, 4, dtype=torch.long)
    pending = torch.arange(batch_size)
    for _ in range(max_rounds):
        if pending.numel() == 0:
            return origins
        count = pending.numel()
        large = torch.randint(0, grid_size - 2 * n + 1, (count, 2), generator=generator)
        parity = large % 2
        # Small origins with the large origin's parity: parity + 2k <= grid_size - n.
        choices = (grid_size - n - parity) // 2 + 1
        small = parity + 2 * (torch.rand(count, 2, generator=generator) * choices).long().clamp(
            max=choices - 1
        )
        accepted = _overlap_fraction(large, small, n) >= min_overlap
        origins[pending[accepted]] = torch.cat([large, small], dim=1)[accepted]
        pending = pending[~accepted]
    if pending.numel():
        raise RuntimeError(
            f"Could not draw view pairs with min_overlap={min_overlap} in {max_rounds} rounds "
            f"(grid_size={grid_size}, view_tokens={n}); lower min_overlap."
        )
    return origins


__all__ = ["CorrespondenceTargets", "correspondence_targets", "sample_view_origins", "view_geometry_problems"]
