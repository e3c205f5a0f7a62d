"""Reference correspondence targets: plain Python loops, written straight from ace-method.md section 2.

Slow on purpose. It exists to check `ace_hf.correspondence_ace.correspondence_targets` (tests) and to
measure how much the vectorized version gains (bench_correspondence.py). Every quantity below is read
off the spec one sample and one token at a time, in image-cell coordinates (row, col).
"""

import math

import torch


def _gaussian(d_row: int, d_col: int) -> float:
    """Isotropic Gaussian with sigma 1 and peak 1."""
    return math.exp(-(d_row * d_row + d_col * d_col) / 2.0)


def loop_correspondence_targets(
    view_origins: torch.Tensor, view_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlap masks and targets for a batch of view pairs, one sample and one token at a time.

    view_origins: [B, 4] integers (R1, C1, R2, C2), the large and the small view's top-left cell.
    Returns (overlap_large [B, n*n] bool, overlap_small [B, n*n] bool,
    decomposition [B, n*n, 4*n*n] float32, composition [B, n*n, n*n/4] float32), tokens row-major.
    """
    n = view_tokens
    if n % 2:
        raise ValueError(f"view_tokens must be even, got {n}")
    half = n // 2
    origins = view_origins.tolist()
    batch = len(origins)
    overlap_large = torch.zeros(batch, n * n, dtype=torch.bool)
    overlap_small = torch.zeros(batch, n * n, dtype=torch.bool)
    decomposition = torch.zeros(batch, n * n, 4 * n * n)
    composition = torch.zeros(batch, n * n, half * half)

    for b, (R1, C1, R2, C2) in enumerate(origins):
        if (R1 - R2) % 2 or (C1 - C2) % 2:
            raise ValueError(f"sample {b}: origins {(R1, C1, R2, C2)} break the parity rule")

        # Small-view token (r, c) covers cell (R2 + r, C2 + c); it is in the overlap when that cell
        # lies inside the large view's 2n x 2n cells. Its match is the sub-token at that cell.
        for r in range(n):
            for c in range(n):
                sub_row, sub_col = R2 + r - R1, C2 + c - C1
                if not (0 <= sub_row < 2 * n and 0 <= sub_col < 2 * n):
                    continue
                token = r * n + c
                overlap_small[b, token] = True
                for dr in range(-2, 3):
                    for dc in range(-2, 3):
                        row, col = sub_row + dr, sub_col + dc
                        if 0 <= row < 2 * n and 0 <= col < 2 * n:
                            decomposition[b, token, row * 2 * n + col] = _gaussian(dr, dc)

        # Large-view token (r, c) covers cells (R1 + 2r .. +1, C1 + 2c .. +1); in small-view token
        # units that block starts at (R1 + 2r - R2, C1 + 2c - C2), an even offset, so it is exactly
        # one pooled 2 x 2 block of small-view tokens. It is in the overlap when all its cells are.
        for r in range(n):
            for c in range(n):
                row_in_small, col_in_small = R1 + 2 * r - R2, C1 + 2 * c - C2
                if not (0 <= row_in_small < n - 1 and 0 <= col_in_small < n - 1):  # 2 x 2 block inside
                    continue
                pooled_row, pooled_col = row_in_small // 2, col_in_small // 2
                token = r * n + c
                overlap_large[b, token] = True
                for dr in range(-1, 2):
                    for dc in range(-1, 2):
                        row, col = pooled_row + dr, pooled_col + dc
                        if 0 <= row < half and 0 <= col < half:
                            composition[b, token, row * half + col] = _gaussian(dr, dc)

    return overlap_large, overlap_small, decomposition, composition
