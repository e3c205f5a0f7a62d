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

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arguments import (
    ModelSourceError,
    check_model_source,
    check_results_folder,
    parse_arguments,
    read_model_config,
    run_or_exit,
)
from ..configuration_ace import AceConfig
from ..modeling_ace import AceModel
from ..runs import OutputDirError
from .baseline import BASELINE_COLUMN, CONTEXT_RADIUS, PixelEncoder, baseline_description
from .config import EvaluationConfig, ShotsError, check_shots
from .report import results_markdown
from .suite import evaluate_encoder

logger = logging.getLogger(__name__)

RESULTS = ("results.json", "results.md")


@dataclass
class EvaluationArguments:
    """Which encoders to compare and where the results go; what the suite runs is `EvaluationConfig`."""

    model_name_or_path: list[str] = field(
        default_factory=list, metadata={"help": "ACE encoders: folders, Hub ids or pretraining checkpoints."}
    )
    names: list[str] = field(default_factory=list, metadata={"help": "Column names (default: the paths)."})
    random_init: bool = field(
        default=False, metadata={"help": "Also evaluate the first model's architecture at random init."}
    )
    random_init_seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Random-init columns of the first model's architecture for these seeds (the weights a "
            "from-scratch `ace-hf pretrain --seed s` run starts from under the same torch version), all on the same "
            "crops and draws (--seed): paired comparisons over several seeds."
        },
    )
    output_dir: str = field(
        default="outputs/evaluation", metadata={"help": "Folder of results.json and results.md."}
    )
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu",
        metadata={"help": "Device of the encoders (default: cuda when available)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the results an earlier evaluation left in --output_dir."}
    )
    pixel_baseline: bool = field(
        default=True,
        metadata={
            "help": f'A "{BASELINE_COLUMN}" column (no model, 30 to 45 s here): every metric on each token\'s '
            "pixels and its neighbourhood's, the findings on the image pooled to 16 x 16 "
            "(ace_hf.evaluation.baseline). --no_pixel_baseline leaves it out."
        },
    )
    pixel_context_radius: int = field(
        default=CONTEXT_RADIUS,
        metadata={"help": "Tokens around each token in the pixel baseline's matching descriptor (radius)."},
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required (one or more encoders)")
        if self.names and len(self.names) != len(self.model_name_or_path):
            raise ValueError(f"--names needs one name per --model_name_or_path, got {self.names}")
        for path in self.model_name_or_path:
            check_model_source(path, "--model_name_or_path")
        if self.pixel_baseline and BASELINE_COLUMN in (self.names or self.model_name_or_path):
            raise ValueError(
                f'--names "{BASELINE_COLUMN}" is the pixel baseline\'s column: name it otherwise'
            )
        if not 0 <= self.pixel_context_radius <= 7:
            raise ValueError(f"--pixel_context_radius {self.pixel_context_radius}: must be 0 to 7")


def load_encoders(args: EvaluationArguments, seed: int) -> dict[str, AceModel]:
    """The encoders to compare, by column name; the random-init baseline is seeded like pretraining."""
    names = args.names or args.model_name_or_path
    # Every config first: a source that cannot be read fails before any weights load.
    configs = [read_model_config(path, "--model_name_or_path", AceConfig) for path in args.model_name_or_path]
    encoders = {
        name: AceModel.from_pretrained(path, config=config)
        for name, path, config in zip(names, args.model_name_or_path, configs, strict=True)
    }
    config = next(iter(encoders.values())).config
    if args.random_init_seeds:
        warn_if_pretrained_under_another_torch(args.model_name_or_path)
    if args.random_init:
        torch.manual_seed(seed)
        encoders["random init"] = AceModel(config)
    for init_seed in args.random_init_seeds:
        torch.manual_seed(init_seed)
        encoders[f"random init (seed {init_seed})"] = AceModel(config)
    return encoders


def warn_if_pretrained_under_another_torch(paths: list[str]) -> None:
    """A random-init column is a run's own start only under the torch that drew it: torch 2.11's
    nn.init.trunc_normal_ sampled by inverse CDF, 2.14's by rejection, so one seed gives other weights."""
    running = str(torch.__version__).split(".")[:2]
    for path in paths:
        summary = Path(path) / "training_summary.json"
        pretrained_under = json.loads(summary.read_text()).get("torch_version") if summary.is_file() else None
        if pretrained_under and pretrained_under.split(".")[:2] != running:
            logger.warning(
                f"{path} was pretrained under torch {pretrained_under} and this is torch {torch.__version__}: "
                "--random_init_seeds may not rebuild the weights it started from (torch's trunc_normal_ "
                "draws other values for the same seed across versions)."
            )


def run_evaluation(args: EvaluationArguments, config: EvaluationConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every encoder with the same crops and draws; writes results.json and results.md to
    `args.output_dir` and returns the results by column name (each with its wall time).

    Raises, before anything loads or renders: OutputDirError (--output_dir holds earlier results or is
    unusable), ShotsError (a few-shot k the renders cannot supply), ModelSourceError (a model's config cannot
    be read)."""
    output_dir = Path(args.output_dir)
    check_results_folder(output_dir, RESULTS, "--output_dir", args.overwrite_output_dir)
    check_shots(config)
    columns: dict[str, torch.nn.Module] = dict(load_encoders(args, config.seed))
    if args.pixel_baseline:
        model_config = next(iter(columns.values())).config
        columns[BASELINE_COLUMN] = PixelEncoder(model_config, args.pixel_context_radius)
    results, wall_times = {}, {}
    for name, encoder in columns.items():
        logger.info(f"Evaluating {name}")
        start = time.perf_counter()
        results[name] = evaluate_encoder(encoder.to(args.device), config)
        if name == BASELINE_COLUMN:
            results[name]["features"] = baseline_description(args.pixel_context_radius)
        wall_times[name] = round(time.perf_counter() - start, 1)
        results[name]["wall_time_s"] = wall_times[name]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(results_markdown(results))
    logger.info(f"Wrote {output_dir / 'results.md'} and results.json (wall times: {wall_times})")
    return results


def parse_args(argv: list[str] | None = None) -> tuple[EvaluationArguments, EvaluationConfig]:
    """Arguments from the command line, or from a single .json/.yaml file given as the only argument."""
    return parse_arguments((EvaluationArguments, EvaluationConfig), argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Parse the arguments, run the evaluation and print the Markdown table."""
    args, config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    results = run_or_exit(
        lambda: run_evaluation(args, config), (OutputDirError, ShotsError, ModelSourceError)
    )
    print(results_markdown(results))
    return results
