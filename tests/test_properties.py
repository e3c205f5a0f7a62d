"""Property-based tests (hypothesis): the view geometry for any valid configuration and origins, and the image
processor for any input a user may pass."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ace_hf import AceImageProcessor
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


NUMPY_DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_]


@st.composite
def any_image(draw) -> np.ndarray | torch.Tensor:
    """Any array a user may pass: dtype, rank, channels (valid or not), size, values (NaN and inf included)."""
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    height, width = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    shape = draw(
        st.sampled_from(
            [(height, width), (height, width, 1), (height, width, 3), (height, width, 4), (height, width, 2)]
            + [(height,), (2, height, width, 3)]
        )
    )
    if dtype == np.bool_:
        elements = st.booleans()
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    else:
        elements = st.floats(width=16 if dtype == np.float16 else 32, allow_nan=True, allow_infinity=True)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()) and array.ndim in (2, 3) and dtype not in (np.uint16,):
        return torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)
    return array


@settings(max_examples=150, deadline=None)
@given(
    image=any_image(),
    mode=st.sampled_from(["resize", "shortest_edge_crop", "pad"]),
    size=st.sampled_from([16, 32, {"height": 16, "width": 48}]),
    num_channels=st.sampled_from([1, 3]),
)
def test_the_processor_gives_finite_pixels_of_the_size_or_a_value_error(
    image, mode, size, num_channels
) -> None:
    processor = AceImageProcessor(size=16, cell_size=8, view_tokens=2, grid_size=4, num_channels=num_channels)
    try:
        pixels = processor(image, size=size, resize_mode=mode, return_tensors="pt")["pixel_values"]
    except ValueError as error:
        assert str(error), "a ValueError must say what is wrong"
        event("refused")
        return
    event("processed")
    side = size if isinstance(size, dict) else {"height": size, "width": size}
    assert pixels.shape == (1, num_channels, side["height"], side["width"])
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
