"""The model card of a fine-tuned model: what was fine-tuned from what, on what, and how well.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .arguments import FinetuningArguments

PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation"}
TASK_DESCRIPTIONS = {
    "classification": "Single-label classification",
    "multi_label": "Multi-label classification",
    "segmentation": "Semantic segmentation",
}


def write_model_card(output_dir: Path, args: FinetuningArguments, results: dict[str, Any]) -> None:
    """A short README.md: what was fine-tuned from what, on what, and the best validation scores."""
    base_model = None if Path(args.model_name_or_path).exists() else args.model_name_or_path
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[args.task],
        base_model=base_model,
        datasets=[args.dataset_name] if args.dataset_name else None,
        tags=["ace", "medical-imaging"],
    )
    how = (
        "a linear head on the frozen ACE encoder"
        if args.freeze_encoder
        else "the ACE encoder fine-tuned end to end"
    )
    rows = "\n".join(
        f"| {name} | {value:.4f} |" for name, value in results.items() if isinstance(value, float)
    )
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {args.hub_model_id or output_dir.name}\n\n"
        f"{TASK_DESCRIPTIONS[args.task_kind]} with {how} (`{args.model_name_or_path}`), trained with "
        f"ace-hf's `ace_hf.finetuning` on {results['train_samples']} images.\n\n"
        f"Best validation epoch {results['epoch']} ({results['eval_samples']} images):\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )
    ModelCard(content).save(output_dir / "README.md")
