"""Save a contact sheet of built-in chest radiographs (top row) and their anatomy labels (bottom row).

    python examples/render_drr_preview.py /tmp/chest_drr_preview.png --num-images 8 --size 256

A quick way to eyeball the kind of pretraining data that `build_default_dataset` renders (poses,
exposures and noise drawn by the same `sample_render_params`), without building the dataset.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from ace_hf.synthetic.ct import ANATOMY_GROUPS, load_chest_ct
from ace_hf.synthetic.drr import render_drr, sample_render_params

# One colour per anatomy group (background black), blended over the radiograph.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [145, 30, 180],
        [70, 240, 240],
        [245, 130, 48],
        [240, 50, 230],
        [250, 190, 212],
        [170, 110, 40],
    ],
    dtype=np.float32,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="PNG path of the contact sheet")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ct = load_chest_ct()
    anatomy = ct.group_labels()
    generator = torch.Generator().manual_seed(args.seed)
    columns = []
    for _ in range(args.num_images):
        params = sample_render_params(generator)
        image, labels = render_drr(
            ct.attenuation, ct.spacing, size=args.size, generator=generator, anatomy=anatomy, **params
        )
        gray = np.repeat((image / 257.0)[..., None], 3, axis=-1)
        overlay = np.where(labels[..., None] > 0, 0.5 * gray + 0.5 * PALETTE[labels], gray)
        columns.append(np.concatenate([gray, overlay]))
    Image.fromarray(np.concatenate(columns, axis=1).round().astype(np.uint8)).save(args.output)
    legend = ", ".join(
        f"{name}={PALETTE[i].astype(int).tolist()}" for i, name in enumerate(ANATOMY_GROUPS, 1)
    )
    print(f"Saved {args.output} ({legend})")


if __name__ == "__main__":
    main()
