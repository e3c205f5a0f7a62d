"""Publish a pretrained ACE encoder: a Hub-ready folder (weights, remote code, model card) and its upload.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData

from .image_processing_ace import AceImageProcessor
from .modeling_ace import AceModel

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "ace_model_card.md"

# What `save_pretrained` must have written for `trust_remote_code=True` loading: the three modules that
# `register_for_auto_class` copies, plus the files they reach through single-dot imports.
REMOTE_CODE_FILES = (
    "configuration_ace.py",
    "modeling_ace.py",
    "image_processing_ace.py",
    "correspondence_ace.py",
    "losses_ace.py",
)
REQUIRED_AUTO_MAP = {
    "config.json": ("AutoConfig", "AutoModel"),
    "preprocessor_config.json": ("AutoImageProcessor",),
}

CARD_TAGS = ["ace", "self-supervised", "medical-imaging", "chest-x-ray", "vision", "image-feature-extraction"]

# Labels of the known `training_summary` keys (those examples/pretrain.py writes), in table order.
SUMMARY_LABELS = {
    "dataset": "Data",
    "steps": "Optimizer steps",
    "total_steps": "Planned steps",
    "epochs": "Epochs",
    "global_batch_size": "Global batch size",
    "processes": "Processes",
    "final_loss": "Final total loss",
    "final_global_loss": "Final global loss",
    "final_local_loss": "Final local loss",
    "final_decomposition_loss": "Final decomposition loss",
    "final_composition_loss": "Final composition loss",
    "skipped_images": "Skipped unreadable images",
    "wall_time_s": "Wall time",
}


def export_pretrained(
    encoder: AceModel,
    image_processor: AceImageProcessor,
    output_dir: str | os.PathLike,
    *,
    model_id: str | None = None,
    training_summary: dict[str, Any] | None = None,
    dataset_names: list[str] | None = None,
    license: str = "apache-2.0",
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Write a folder that `AutoModel` / `AutoImageProcessor` / `pipeline` load with `trust_remote_code=True`.

    The folder holds float32 safetensors weights, config.json and preprocessor_config.json with `auto_map`,
    the remote-code modules, and a README.md model card. `model_id` ("org/name") is what the card's usage
    snippets load (default: the folder name). `training_summary` keys are listed in `SUMMARY_LABELS` (others
    are shown under their own name); `wall_time_s` is in seconds. Files already in `output_dir` are kept.

    Raises:
        FileNotFoundError: the model card template is missing.
        RuntimeError: the saved folder lacks a file or `auto_map` entry that remote-code loading needs.
    """
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {str(template)!r} not found; pass template_path= (the default "
            "model_cards/ace_model_card.md exists only in a source checkout of ace-hf)."
        )
    output_dir = Path(output_dir)
    if any(param.dtype != torch.float32 for param in encoder.parameters()):
        # Published weights are float32; convert a copy so the caller's model stays as it is.
        encoder = copy.deepcopy(encoder).float()
    encoder.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    _check_remote_code(output_dir)

    model_id = model_id or output_dir.resolve().name
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=[*CARD_TAGS, encoder.config.backbone_type],
        license=license,
        datasets=dataset_names,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_id=model_id,
        model_name=model_id.split("/")[-1],
        training_rows=_summary_rows(training_summary or {}),
        **_model_facts(encoder),
    )
    card.save(output_dir / "README.md")
    return output_dir


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload ACE encoder",
    api: HfApi | None = None,
) -> str:
    """Create the model repo `repo_id` ("namespace/name") if needed and upload `folder` as one commit.

    Only the folder's top-level files go up: an export is flat, and training writes checkpoints (optimizer
    state) and logs in subfolders next to it. Returns the commit URL. `api` is injectable so tests can record
    the calls instead of reaching the Hub.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; write it with export_pretrained first.")
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        commit_message=commit_message,
        allow_patterns=sorted(path.name for path in folder.iterdir() if path.is_file()),
    )
    return str(commit)


def _check_remote_code(folder: Path) -> None:
    """Fail at export, not at a user's first `from_pretrained`, when remote-code loading cannot work."""
    problems = [name for name in ("model.safetensors", *REMOTE_CODE_FILES) if not (folder / name).is_file()]
    for config_name, auto_classes in REQUIRED_AUTO_MAP.items():
        path = folder / config_name
        auto_map = json.loads(path.read_text()).get("auto_map", {}) if path.is_file() else {}
        problems += [f"{config_name}: auto_map[{name!r}]" for name in auto_classes if name not in auto_map]
    if problems:
        raise RuntimeError(
            f"The export in {str(folder)!r} cannot be loaded with trust_remote_code=True; missing: "
            f"{', '.join(problems)}. Each remote-code class must call register_for_auto_class()."
        )


def _model_facts(encoder: AceModel) -> dict[str, Any]:
    """Backbone and size facts for the model card, read from the config and the weights."""
    config = encoder.config
    if config.backbone_type == "swin":
        backbone = (
            f"Swin, depths {list(config.depths)}, heads {list(config.num_heads)}, window {config.window_size}, "
            f"patch {config.patch_size}"
        )
    else:
        backbone = (
            f"ViT, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"patch {config.patch_size}"
        )
    return {
        "backbone": backbone,
        "backbone_type": config.backbone_type,
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "token_stride": config.token_stride,
        "token_grid": config.image_size // config.token_stride,
        "width": config.feature_dim,
        "num_parameters": f"{sum(param.numel() for param in encoder.parameters()):,}",
    }


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: known keys first in SUMMARY_LABELS order, then any others as given."""
    keys = [key for key in SUMMARY_LABELS if key in summary] + [
        key for key in summary if key not in SUMMARY_LABELS
    ]
    return [(SUMMARY_LABELS.get(key, key), _format_value(key, summary[key])) for key in keys]


def _format_value(key: str, value: Any) -> str:
    if key == "wall_time_s" and isinstance(value, int | float):
        minutes, seconds = divmod(round(value), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes:02d} min {seconds:02d} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


__all__ = ["export_pretrained", "push_to_hub"]
