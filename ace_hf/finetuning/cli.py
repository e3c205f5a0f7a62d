r"""Fine-tune (or linearly probe) an ACE encoder for image classification or semantic segmentation.

    ace-hf finetune --model_name_or_path outputs/ace-pretrain --train_dir my_xrays   # class folders
    ace-hf finetune --model_name_or_path org/ace-vit-b --train_csv train.csv --multi_label \
        --label_columns effusion,nodule --freeze_encoder --learning_rate 1e-3                    # linear probe
    accelerate launch -m ace_hf finetune --task segmentation --model_name_or_path org/ace-vit-b \
        --train_csv masks.csv --train_fraction 0.1                                                # 10% of labels
    ace-hf finetune ... --size 224 --max_steps 500 --report_to tensorboard   # input size, steps, logs
    ace-hf finetune ... --resume_from_checkpoint latest                # continue an interrupted run
    ace-hf finetune finetune.yaml                                      # the options in one file

Data: an image folder (labels from the folder names; train/ and validation/ subfolders give both splits), a Hub
dataset, or CSV files with image paths relative to the CSV (`image` and `label` columns, 0/1 columns for
multi-label, `image` and `mask` columns for segmentation, masks being integer label PNGs). Without a validation
split, `--validation_fraction` of the train set is held out with `--seed` before any few-shot or fraction
subsampling: for one seed, every point of a label-efficiency curve is scored on the same images (to compare
several few-shot draws, vary `--seed` with a fixed validation split). Each epoch is evaluated with the offline
metric modules of `ace_hf.metrics`; the best epoch's model, image processor and `eval_results.json` are written
to `--output_dir`, which must not hold another run's model (or pass `--overwrite_output_dir`). The training state
is saved at each epoch's end in `--output_dir/checkpoints`, for `--resume_from_checkpoint`. A mistake (a path
that is not there, a CSV row naming a missing file, a mask value without a class name, too few examples for
`--shots_per_class`) is one `error:` line, before the model loads.
"""

from __future__ import annotations

import logging
from typing import Any

from ..arguments import ModelSourceError, SizeError, parse_arguments, run_or_exit
from ..runs import OutputDirError, RunMismatchError
from .arguments import FinetuningArguments


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command-line entry: parse the options and run `finetune`."""
    args = parse_arguments(FinetuningArguments, argv, description=__doc__)
    # Imported once the arguments hold: they load torch, which `--help` and argument mistakes need not wait for.
    from ..hub import HubPushError
    from .data import DataError
    from .loop import finetune

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # A push that cannot work (refused before training) or that failed after it, and the mistakes found before
    # the model loads (the output folder, the model, --size, the data) or on resuming: one line, no traceback.
    user_errors = (HubPushError, OutputDirError, ModelSourceError, SizeError, DataError, RunMismatchError)
    return run_or_exit(lambda: finetune(args), user_errors)
