"""The `ace-hf` command: one subcommand per job, each a thin front to a library function.

    ace-hf pretrain --max_steps 2 --output_dir run        # python -m ace_hf pretrain ... works the same
    accelerate launch --num_processes 8 -m ace_hf pretrain --model_preset ace-vit-b
    ace-hf finetune --model_name_or_path run --train_dir labelled
    ace-hf evaluate --model_name_or_path run --random_init
    ace-hf extract-features --model_name_or_path run --input images --output features
    ace-hf visualize --model_name_or_path run --heldout 4
    ace-hf convert --checkpoint ace_swin_b.pth --output_dir ace-swin-b

Each subcommand takes its options on the command line or from one JSON/YAML file (`ace-hf pretrain run.yaml`);
`ace-hf SUBCOMMAND --help` lists them with their defaults. A subcommand's module is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module whose `main(argv)` runs it, one line for `ace-hf --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "ace_hf.pretraining.cli",
        "Pretrain an ACE encoder (one CPU, one GPU or many) and export it.",
    ),
    "finetune": (
        "ace_hf.finetuning.cli",
        "Fine-tune or linearly probe an encoder for classification or segmentation.",
    ),
    "evaluate": (
        "ace_hf.evaluation.cli",
        "Measure encoders on held-out radiographs (matching, few-shot tasks).",
    ),
    "extract-features": (
        "ace_hf.commands.extract_features",
        "Global and dense embeddings of a folder of images.",
    ),
    "visualize": ("ace_hf.commands.visualize", "PCA and query-similarity pictures of dense embeddings."),
    "convert": (
        "ace_hf.commands.convert",
        "Convert an official ACE (or DINO/timm) checkpoint into a Hub folder.",
    ),
}


def usage() -> str:
    """The top-level help: the subcommands, one line each."""
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items())
    return (
        f"usage: ace-hf SUBCOMMAND [options] | ace-hf SUBCOMMAND options.yaml\n\nsubcommands:\n{rows}\n\n"
        + ("Run `ace-hf SUBCOMMAND --help` for a subcommand's options.")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named by the first argument; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, options = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{usage()}\n\nace-hf: error: unknown subcommand {name!r}", file=sys.stderr)
        return 2
    program, sys.argv[0] = sys.argv[0], f"ace-hf {name}"  # the subcommand's usage line names it
    try:
        status = importlib.import_module(SUBCOMMANDS[name][0]).main(options)
    finally:
        sys.argv[0] = program
    return status if isinstance(status, int) else 0
