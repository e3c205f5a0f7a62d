"""`run_evaluation`: the suite (`ace_hf.evaluation.suite`) on several encoders, with the same crops and draws,
and the results written as results.json and results.md. Its command line is `ace-hf evaluate`
(`ace_hf.evaluation.cli`).

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..arguments import check_results_folder, read_model_config, resolve_device
from ..configuration_ace import AceConfig
from ..modeling_ace import AceModel
from .arguments import BASELINE_COLUMN, EvaluationArguments
from .baseline import PixelEncoder, baseline_description
from .config import EvaluationConfig, check_shots
from .report import results_markdown
from .suite import evaluate_encoder

logger = logging.getLogger(__name__)

RESULTS = ("results.json", "results.md")


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
    device = resolve_device(args.device)
    results, wall_times = {}, {}
    for name, encoder in columns.items():
        logger.info(f"Evaluating {name}")
        start = time.perf_counter()
        results[name] = evaluate_encoder(encoder.to(device), config)
        if name == BASELINE_COLUMN:
            results[name]["features"] = baseline_description(args.pixel_context_radius)
        wall_times[name] = round(time.perf_counter() - start, 1)
        results[name]["wall_time_s"] = wall_times[name]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(results_markdown(results))
    logger.info(f"Wrote {output_dir / 'results.md'} and results.json (wall times: {wall_times})")
    return results
