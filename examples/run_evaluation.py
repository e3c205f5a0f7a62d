"""Evaluate ACE encoders on held-out chest radiographs: anatomical consistency, few-shot segmentation and
findings classification (see `ace_hf.evaluation`). Writes `results.json` and `results.md` to --output_dir.

    python examples/run_evaluation.py --model_name_or_path outputs/ace-pretrain --random_init
    python examples/run_evaluation.py --model_name_or_path org/ace-vit-b outputs/my-run --names hub mine

Every field of `ace_hf.evaluation.EvaluationConfig` is an option (--num_anatomy_images, --segmentation_shots
1 5 20, --finetune_steps 0 to skip fine-tuning, ...). `--random_init` adds the first model's architecture
at random initialization, the baseline a pretrained encoder must beat; `--random_init_seeds 0 1 2` adds the
random initializations of several pretraining seeds, evaluated on the same crops and draws.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from ace_hf import AceModel
from ace_hf.evaluation import EvaluationConfig, evaluate_encoder, results_markdown

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
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
            "from-scratch `pretrain.py --seed s` run starts from under the same torch version), all on the same "
            "crops and draws (--seed): paired comparisons over several seeds."
        },
    )
    output_dir: str = field(default="outputs/evaluation")
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu")


def load_encoders(args: ScriptArguments, seed: int) -> dict[str, AceModel]:
    """The encoders to compare, by column name; the random-init baseline is seeded like pretraining."""
    if args.names and len(args.names) != len(args.model_name_or_path):
        raise ValueError(f"--names needs one name per --model_name_or_path, got {args.names}")
    names = args.names or args.model_name_or_path
    encoders = {
        name: AceModel.from_pretrained(path)
        for name, path in zip(names, args.model_name_or_path, strict=True)
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


def main(argv: list[str] | None = None) -> dict:
    script_args, eval_config = HfArgumentParser(
        (ScriptArguments, EvaluationConfig)
    ).parse_args_into_dataclasses(argv)
    if not script_args.model_name_or_path:
        raise SystemExit("--model_name_or_path is required (one or more encoders)")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    results, wall_times = {}, {}
    for name, encoder in load_encoders(script_args, eval_config.seed).items():
        logger.info(f"Evaluating {name}")
        start = time.perf_counter()
        results[name] = evaluate_encoder(encoder.to(script_args.device), eval_config)
        wall_times[name] = round(time.perf_counter() - start, 1)
        results[name]["wall_time_s"] = wall_times[name]
    output_dir = Path(script_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = results_markdown(results)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(table)
    print(table)
    logger.info(f"Wrote {output_dir / 'results.md'} and results.json (wall times: {wall_times})")
    return results


if __name__ == "__main__":
    main()
