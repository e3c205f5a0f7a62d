"""What transfers to a real film: a linear anatomy head trained on labelled renders, applied to a real radiograph.

    python docs/figures/real/segmentation_overlay.py /tmp/fresh/outputs/ace-pretrain docs/figures/real

The head is the evaluation suite's linear probe (BatchNorm + 1 x 1 convolution on frozen patch embeddings,
`ace_hf.evaluation.fewshot.train_full_batch` with its loss and settings), trained on every training render of the
suite's held-out anatomy set (64 renders, the first 24 kept for testing); the real film is pydicom-data's PA chest
radiograph (pip install pydicom-data), windowed and embedded as `ace-hf visualize` does. Writes
segmentation_overlay.png: the film with its predicted anatomy, and a test render with its prediction and labels.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file

from ace_hf import AceImageProcessor, AceModel
from ace_hf.evaluation.config import EvaluationConfig, num_test_renders
from ace_hf.evaluation.fewshot import segmentation_loss, segmentation_scores, train_full_batch
from ace_hf.evaluation.heldout import encode, load_heldout
from ace_hf.modeling_ace import AceForSemanticSegmentation
from ace_hf.visualization import image_grid, to_pil
from ace_hf.visualize import embed_files, window_files

# One colour per anatomy group (background keeps the image).
PALETTE = np.array(
    [
        (0, 0, 0),  # background
        (230, 25, 75),  # lung_right
        (60, 180, 75),  # lung_left
        (255, 225, 25),  # heart
        (245, 130, 48),  # aorta
        (70, 240, 240),  # trachea
        (0, 130, 200),  # spine
        (240, 50, 230),  # ribs
        (170, 110, 40),  # clavicles
        (128, 128, 0),  # scapulae
        (145, 30, 180),  # liver
    ],
    dtype=np.float64,
)


def painted(image: torch.Tensor, labels: torch.Tensor) -> PIL.Image.Image:
    """A grayscale image [H, W] in [0, 1] with a label map [H, W] blended over it (background left as is)."""
    gray = image.clamp(0, 1).numpy()[..., None].repeat(3, -1) * 255
    colours = PALETTE[labels.numpy()]
    blended = np.where(labels.numpy()[..., None] > 0, 0.45 * gray + 0.55 * colours, gray)
    return PIL.Image.fromarray(blended.round().astype(np.uint8), mode="RGB")


def legend(names: list[str], size: int) -> PIL.Image.Image:
    """Colour swatches with the anatomy groups' names."""
    image = PIL.Image.new("RGB", (size, size), "white")
    draw = PIL.ImageDraw.Draw(image)
    for index, name in enumerate(names, start=1):
        top = 12 + (index - 1) * 24
        draw.rectangle((12, top, 30, top + 16), fill=tuple(int(c) for c in PALETTE[index]))
        draw.text((40, top + 2), name, fill="black")
    return image


def main(model_folder: str, output_dir: str) -> None:
    torch.manual_seed(0)
    encoder = AceModel.from_pretrained(model_folder).eval()
    processor = AceImageProcessor.from_pretrained(model_folder)
    config = EvaluationConfig()
    size = encoder.config.grid_size * encoder.config.token_stride  # the suite's render size
    data = load_heldout(config.num_anatomy_images, size, False, None)
    labels = data.info["anatomy_labels"]
    num_test = num_test_renders(len(data.images), config)
    dense, _ = encode(encoder, data.images, config.batch_size)

    head_config = copy.deepcopy(encoder.config)
    head_config.num_labels = len(labels)
    head = AceForSemanticSegmentation(head_config).classifier
    train_full_batch(
        head, dense[num_test:], data.anatomy[num_test:], segmentation_loss,
        config.probe_steps, config.probe_learning_rate,
    )  # fmt: skip

    def predict(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = F.interpolate(head(features), size=(size, size), mode="bilinear", align_corners=False)
        return logits.argmax(1)

    test_predictions = predict(dense[:num_test])
    miou = segmentation_scores(test_predictions, data.anatomy[:num_test], len(labels))
    print(
        f"linear head on {len(data.images) - num_test} renders: mean IoU {miou:.3f} on {num_test} test renders"
    )

    film = Path(get_testdata_file("RG1_UNCI.dcm"))
    film_image = window_files([film], size)[0, 0]
    film_prediction = predict(embed_files(encoder, processor, [film], size, 1))[0]
    shares = {name: float((film_prediction == index).float().mean()) for index, name in enumerate(labels)}
    print("film, predicted area share: " + ", ".join(f"{name} {share:.2f}" for name, share in shares.items()))

    test_image = data.images[0, 0]
    rows = [
        [to_pil(film_image), painted(film_image, film_prediction), legend(labels[1:], size)],
        [to_pil(test_image), painted(test_image, test_predictions[0]), painted(test_image, data.anatomy[0])],
    ]
    row_labels = [
        "real film (RG1_UNCI.dcm): the anatomy a linear head trained on renders predicts",
        f"held-out test render: prediction (mean IoU {miou:.2f} over {num_test} test renders), labels",
    ]
    output = Path(output_dir) / "segmentation_overlay.png"
    image_grid(rows, row_labels).save(output)
    print(output)


if __name__ == "__main__":
    main(*sys.argv[1:])
