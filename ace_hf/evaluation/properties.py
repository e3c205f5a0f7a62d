"""Property analysis on frozen dense embeddings: does an encoder give the same anatomy the same embedding?

- `anatomical_matching`: each patch is labelled with the fine structure under it (each rib, vertebra, lung
  lobe, ...); its cosine-nearest patch in another radiograph must cover the same structure (balanced accuracy
  over structures);
- `landmark_matching`: the embedding at a landmark's exact position (a structure centroid projected through
  the render geometry) is looked up in another radiograph; the error is the pixel distance between the most
  similar patch and the landmark's true position there;
- `view_correspondence`: in ACE's own two views, each small-view token must find the large-view token over
  the same cells.

The suite crops radiographs randomly first (`random_crops`), so that position embeddings alone cannot match
anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..correspondence_ace import correspondence_targets
from ..image_processing_ace import AceImageProcessor
from ..metrics import load_metric
from ..modeling_ace import AceModel
from .heldout import encode, unnormalize_pixels


def patch_labels(label_maps: torch.Tensor, stride: int, min_fraction: float = 0.5) -> torch.Tensor:
    """Per-patch labels [N, h, w] of label maps [N, H, W]: the label covering at least `min_fraction` of the
    patch's pixels, else -1. Label 0 (nothing) is also -1: background patches are not anatomy."""
    n, height, width = label_maps.shape
    h, w = height // stride, width // stride
    patches = (
        label_maps[:, : h * stride, : w * stride].reshape(n, h, stride, w, stride).permute(0, 1, 3, 2, 4)
    )
    patches = patches.reshape(n, h, w, stride * stride)
    mode = patches.mode(dim=-1).values
    share = (patches == mode.unsqueeze(-1)).float().mean(-1)
    return torch.where((share >= min_fraction) & (mode > 0), mode, torch.full_like(mode, -1))


def random_crops(side: int, crop: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """Top-left corners of `count` random `crop x crop` boxes inside a `side x side` image."""
    corners = torch.randint(0, side - crop + 1, (count, 2), generator=generator)
    return [(int(top), int(left)) for top, left in corners]


def _unit(features: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> L2-normalized tokens [N, h*w, C]."""
    return F.normalize(features.flatten(2).transpose(1, 2).double(), dim=-1)


def anatomical_matching(
    features: torch.Tensor, labels: torch.Tensor, desc: str | None = None
) -> dict[str, float]:
    """Cross-radiograph patch matching: for every labelled patch of image i and every other image j in which
    its structure is visible, does the cosine-nearest patch of j carry the same structure label?

    Args:
        features: [N, C, h, w] dense embeddings.
        labels: [N, h, w] structure per patch (-1: none).
        desc: a progress bar over the query images, with this description (None: no bar).
    Returns:
        balanced_accuracy (mean over structures of the per-structure hit rate), accuracy, chance (the
        balanced hit rate of a uniformly random patch of j), position_only (the balanced accuracy of guessing
        the patch at the same place in j: what knowing only where a patch sits in its image scores),
        num_structures and num_queries.
    """
    tokens, flat = _unit(features), labels.flatten(1)
    predictions, references, chance, same_place = [], [], [], []
    for i in tqdm(range(len(tokens)), desc=desc, disable=desc is None, unit="image"):
        for j in range(len(tokens)):
            if i == j:
                continue
            query = flat[i] >= 0
            query &= torch.isin(flat[i], flat[j][flat[j] >= 0])
            if not query.any():
                continue
            nearest = (tokens[i][query] @ tokens[j].T).argmax(-1)
            predictions.append(flat[j][nearest])
            same_place.append(flat[j][query])
            references.append(flat[i][query])
            chance.append((flat[i][query, None] == flat[j][None, :]).double().mean(-1))
    predictions, references, chance = torch.cat(predictions), torch.cat(references), torch.cat(chance)
    balanced_accuracy = load_metric("balanced_accuracy")
    scores = balanced_accuracy.compute(predictions=predictions, references=references)
    position_only = balanced_accuracy.compute(predictions=torch.cat(same_place), references=references)
    structures = references.unique()
    chance_per_structure = torch.stack([chance[references == s].mean() for s in structures])
    return {
        "balanced_accuracy": float(scores["balanced_accuracy"]),
        "accuracy": float((predictions == references).double().mean()),
        "chance": float(chance_per_structure.mean()),
        "position_only": float(position_only["balanced_accuracy"]),
        "num_structures": len(structures),
        "num_queries": len(references),
    }


def landmark_matching(
    features: torch.Tensor,
    landmarks: torch.Tensor,
    stride: int,
    margin: float | None = None,
    desc: str | None = None,
) -> dict[str, float]:
    """Landmark matching across radiographs with exact ground truth from the render geometry.

    The embedding at landmark p of image i (bilinear between tokens) is compared with every token of image
    j; the predicted position is the most similar token's centre, the error its pixel distance to p's true
    position in j. Landmarks closer than `margin` (default: one token) to a border of either image are
    skipped.

    Args:
        features: [N, C, h, w] dense embeddings of images whose pixels map 1:1 onto `landmarks`.
        landmarks: [N, P, 2] (row, col) in pixels, pixel centres at integers.
        stride: pixels per token.
        desc: a progress bar over the query images, with this description (None: no bar).
    Returns:
        median and mean error in pixels, pck (share of errors within one token stride), the same errors
        for a position-only guess ("same pixel as in image i") as a reference, and the number of pairs.
    """
    n, _, h, w = features.shape
    margin = stride if margin is None else margin
    size = torch.tensor([h * stride, w * stride], dtype=torch.float32)
    inside = ((landmarks >= margin) & (landmarks <= size - 1 - margin)).all(-1)  # [N, P]
    tokens = _unit(features)
    centres = (
        torch.stack(torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij"), -1)
        .reshape(-1, 2)
        .float()
        + (stride - 1) / 2
    )
    # grid_sample coordinates of each landmark in token units (align_corners=False: token centres).
    grid = torch.stack(
        [(landmarks[..., 1] + 0.5) / (w * stride), (landmarks[..., 0] + 0.5) / (h * stride)], -1
    )
    queries = F.grid_sample(features.double(), (grid * 2 - 1)[:, None].double(), align_corners=False)[:, :, 0]
    queries = F.normalize(queries.transpose(1, 2), dim=-1)  # [N, P, C]
    errors, baseline = [], []
    for i in tqdm(range(n), desc=desc, disable=desc is None, unit="image"):
        for j in range(n):
            both = inside[i] & inside[j]
            if i == j or not both.any():
                continue
            nearest = (queries[i][both] @ tokens[j].T).argmax(-1)
            errors.append((centres[nearest] - landmarks[j][both]).norm(dim=-1))
            baseline.append((landmarks[i][both] - landmarks[j][both]).norm(dim=-1))
    errors, baseline = torch.cat(errors), torch.cat(baseline)
    return {
        "median_error_px": float(errors.median()),
        "mean_error_px": float(errors.mean()),
        "pck": float((errors <= stride).float().mean()),
        "position_only_median_error_px": float(baseline.median()),
        "num_pairs": len(errors),
    }


def small_to_large_token(view_origins: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n*n]: for each small-view token, the index of the large-view token over it (both row-major).

    Small token (r, c) covers cell (R2 + r, C2 + c), which is cell (R2 - R1 + r, C2 - C1 + c) of the large
    view, whose tokens cover 2 x 2 cells: the large token is that cell // 2. Meaningful only for the small
    tokens inside the large view (`correspondence_targets(...).overlap_small`).
    """
    origins = view_origins.long()
    rows = torch.arange(n, device=origins.device).repeat_interleave(n)
    cols = torch.arange(n, device=origins.device).repeat(n)
    large_row = (origins[:, 2:3] + rows - origins[:, 0:1]) // 2
    large_col = (origins[:, 3:4] + cols - origins[:, 1:2]) // 2
    return large_row * n + large_col


@torch.no_grad()
def view_correspondence(
    model: AceModel, images: torch.Tensor, seed: int, batch_size: int = 16, desc: str | None = None
) -> dict[str, float]:
    """ACE's own task on held-out radiographs: for each small-view token inside the overlap, is the
    cosine-nearest large-view token the one over the same cells? Views without photometric augmentation.
    `desc`: a progress bar over the batches, with this description (None: no bar)."""
    config = model.config
    processor = AceImageProcessor.from_ace_config(config)
    hits, total = 0, 0
    generator = torch.Generator().manual_seed(seed)
    n = config.view_tokens
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
        views = processor.sample_views(
            list(images[start : start + batch_size]), do_augment=False, generator=generator
        )
        large, _ = encode(model, unnormalize_pixels(views["pixel_values_large"], processor), batch_size)
        small, _ = encode(model, unnormalize_pixels(views["pixel_values_small"], processor), batch_size)
        targets = correspondence_targets(views["view_origins"], n)
        truth = small_to_large_token(views["view_origins"], n)
        nearest = torch.einsum("bsc,blc->bsl", _unit(small), _unit(large)).argmax(-1)
        valid = targets.overlap_small
        hits += int((nearest == truth)[valid].sum())
        total += int(valid.sum())
    return {"accuracy": hits / total, "chance": 1 / (n * n), "num_tokens": total}
