"""Evaluate ACE encoders on held-out chest radiographs: anatomical consistency, few-shot segmentation and
findings classification (see `ace_hf.evaluation.suite`). Writes `results.json` and `results.md` to --output_dir.

    ace-hf evaluate --model_name_or_path outputs/ace-pretrain --random_init
    ace-hf evaluate --model_name_or_path org/ace-vit-b outputs/my-run --names hub mine

Every field of `ace_hf.evaluation.config.EvaluationConfig` is an option (--num_anatomy_images,
--segmentation_shots 1 5 20, --finetune_steps 0 to skip fine-tuning, ...). `--random_init` adds the first model's
architecture at random initialization, the baseline a pretrained encoder must beat; `--random_init_seeds 0 1 2`
adds the random initializations of several pretraining seeds, evaluated on the same crops and draws. A "pixel
baseline" column, on by default (--no_pixel_baseline), scores the pixels themselves through the same metrics: no
model, 30 to 45 s here (`ace_hf.evaluation.baseline`). A single .json or .yaml file of options can stand for the
command line.

Time, measured on the project's 2-core CPU for an ace-vit-tiny export (320 px renders): the first run renders
the 64 + 120 held-out radiographs (about 2 minutes, 0.6 s each; cached in --cache_dir, by default
HF_DATASETS_CACHE/ace_hf), then each column takes about 70 s (few-shot segmentation with fine-tuning 40 s,
findings 17 s, matching 8 s): the default `--random_init` command takes about 4.5 minutes the first time and 2.5
after. The same command took 21 minutes while other jobs shared the CPU. `--quick` renders 24 + 48 radiographs
(45 s, once) and takes about 5 s per column. Larger encoders and renders (ace-vit-b renders 1024 px) take far
longer on a CPU (not measured); each task's progress bar shows its rate and the time left.

An --output_dir that already holds results is refused unless --overwrite_output_dir; a missing model folder or a
few-shot k the renders cannot supply is one `error:` line before anything loads or renders.

The command line of `ace_hf.evaluation.run.run_evaluation`. Training-side module: never imported by the files
that travel to the Hub.
"""

from __future__ import annotations

import logging
from typing import Any

from ..arguments import ModelSourceError, parse_arguments, run_or_exit
from ..runs import OutputDirError
from .arguments import EvaluationArguments
from .config import EvaluationConfig, ShotsError
from .report import results_markdown


def parse_args(argv: list[str] | None = None) -> tuple[EvaluationArguments, EvaluationConfig]:
    """Arguments from the command line, or from a single .json/.yaml file given as the only argument."""
    return parse_arguments((EvaluationArguments, EvaluationConfig), argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Parse the arguments, run the evaluation and print the Markdown table."""
    args, config = parse_args(argv)
    # Imported once the arguments hold: it loads torch, which `--help` and argument mistakes need not wait for.
    from .run import run_evaluation

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    results = run_or_exit(
        lambda: run_evaluation(args, config), (OutputDirError, ShotsError, ModelSourceError)
    )
    print(results_markdown(results))
    return results
