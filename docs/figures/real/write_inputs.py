"""The input files of the figures in this folder: held-out renders and the real film, side by side.

    python docs/figures/real/write_inputs.py /tmp/real/inputs

Writes render0.png .. render2.png (the first three held-out anatomy renders at 320 px, the default encoder's
pretraining size, as 16-bit PNGs), RG1_UNCI.dcm (pydicom-data's PA chest film: pip install pydicom-data) and
film_gamma.png (the film as the package windows it, raised to the power 2.5: darker mid-tones, lungs about as
dark as on the renders; 16 bits).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
from pydicom.data import get_testdata_file

from ace_hf import AceImageProcessor
from ace_hf.evaluation.heldout import load_heldout
from ace_hf.image_io import decode_image

RENDER_SIZE = 320  # grid_size 20 x token_stride 16 of the default encoder
GAMMA = 2.5


def as_png16(image: np.ndarray, path: Path) -> None:
    PIL.Image.fromarray((image * 65535).round().astype(np.uint16)).save(path)


def main(output_dir: str) -> None:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    renders = load_heldout(3, RENDER_SIZE, False, None).images
    for index, render in enumerate(renders):
        as_png16(render[0].numpy(), folder / f"render{index}.png")
    film = shutil.copy(get_testdata_file("RG1_UNCI.dcm"), folder / "RG1_UNCI.dcm")
    windowed = AceImageProcessor(num_channels=1).to_unit_float(decode_image(film))[0].numpy()
    as_png16(windowed**GAMMA, folder / "film_gamma.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
