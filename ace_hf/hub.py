"""Publish a pretrained ACE encoder: a Hub-ready folder (weights, remote code, model card) and its upload, whose
target is checked before any training so that a push fails at the start, not after it.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shlex
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import httpx, validate_repo_id
from safetensors.torch import load_file, save_file

from .configuration_ace import AceConfig
from .evaluation.report import results_markdown
from .image_processing_ace import AceImageProcessor
from .modeling_ace import AceForImageClassification, AceForPreTraining, AceForSemanticSegmentation, AceModel
from .runs import normal_file_permissions

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "ace_model_card.md"  # package data

# What `save_pretrained` must have written for `trust_remote_code=True` loading: the three modules that
# `register_for_auto_class` copies, plus the files they reach through single-dot imports.
REMOTE_CODE_FILES = (
    "configuration_ace.py",
    "modeling_ace.py",
    "image_processing_ace.py",
    "correspondence_ace.py",
    "losses_ace.py",
    "presets_ace.py",
)
# The Auto classes an export must map to its remote code: the encoder and its image processor, and the task
# heads that fine-tuning starts from it (`AutoModelForImageClassification.from_pretrained(export, num_labels=3)`).
REQUIRED_AUTO_MAP = {
    "config.json": (
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForSemanticSegmentation",
    ),
    "preprocessor_config.json": ("AutoImageProcessor",),
}
# `save_pretrained` of the encoder maps only AceModel; these register the other Auto classes of config.json.
TASK_HEADS = (AceForImageClassification, AceForSemanticSegmentation)

# Written next to the encoder so that continued pretraining keeps the heads (as RAD-DINO ships its DINO head).
PRETRAINING_HEADS_NAME = "pretraining_heads.safetensors"
# Files in subfolders (training's checkpoints and logs, next to the export) stay off the Hub: an export is flat.
SUBFOLDER_FILES = "*/*"
# How long the check before training waits for the Hub's answer: huggingface_hub sets no timeout, and an
# unreachable network would otherwise hold the run for the operating system's connect timeout (minutes).
HUB_CHECK_TIMEOUT_S = 10.0
TOKEN_FIX = "pass --hub_token, set HF_TOKEN, or run `hf auth login`"
OFFLINE_FIX = (
    "connect to the Hub (and unset HF_HUB_OFFLINE), or train without --push_to_hub and upload the export "
    "later with `hf upload`"
)

# Every file export_pretrained writes.
EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    PRETRAINING_HEADS_NAME,
    *REMOTE_CODE_FILES,
)

# Fewer optimizer steps than this (or fewer than planned) make an export a smoke test, and its card says so.
SMOKE_TEST_STEPS = 100
# How ace_hf.pretraining.data describes the built-in data set: DRRs rendered from one chest CT.
BUILTIN_DATA_PREFIX = "built-in chest DRRs"
# The evaluation section sits between these markers, so that push_to_hub can fill it in later.
EVALUATION_START, EVALUATION_END = "<!-- ace-evaluation -->", "<!-- /ace-evaluation -->"

CARD_TAGS = ["ace", "self-supervised", "medical-imaging", "vision", "image-feature-extraction"]

# Labels of the known `training_summary` keys (those ace_hf.pretraining writes), in table order.
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
    "torch_version": "PyTorch",
    "recipe": "Recipe (learning rate per 256 images)",
    "segments": "Run segments",
}


def export_pretrained(
    encoder: AceModel,
    image_processor: AceImageProcessor,
    output_dir: str | os.PathLike,
    *,
    model_id: str | None = None,
    training_summary: dict[str, Any] | None = None,
    dataset_names: list[str] | None = None,
    base_model: str | None = None,
    evaluation_results: str | os.PathLike | Mapping[str, Any] | None = None,
    pretraining_heads: AceForPreTraining | Mapping[str, torch.Tensor] | None = None,
    license: str = "apache-2.0",
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Write a folder that `AutoModel` / `AutoImageProcessor` / `pipeline` load with `trust_remote_code=True`,
    and that `AutoModelForImageClassification` / `AutoModelForSemanticSegmentation` load as task heads around it.

    The folder holds float32 safetensors weights, config.json and preprocessor_config.json with `auto_map`,
    the remote-code modules, and a README.md model card. `model_id` ("org/name") is what the card's usage
    snippets load (default: the folder name). `training_summary` keys are listed in `SUMMARY_LABELS` (others
    are shown under their own name); `wall_time_s` is in seconds; its "dataset" describes the data in the card.
    `dataset_names` and `base_model` (the encoder pretraining continued from) enter the card's metadata when
    they are Hub ids; local paths are left out. `evaluation_results` is `ace-hf evaluate`'s
    results.json (path or dict). `pretraining_heads` (the `AceForPreTraining` model or its
    `pretraining_heads_state_dict()`) are saved to pretraining_heads.safetensors, for continued pretraining.
    Other files already in `output_dir` are kept, except a pretraining_heads.safetensors that this export
    does not write (it would pair older heads with these weights).

    Raises:
        FileNotFoundError: the model card template is missing.
        RuntimeError: the saved folder lacks a file or `auto_map` entry that remote-code loading needs.
    """
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {str(template)!r} not found; pass template_path= (the default ships "
            "inside the ace_hf package: reinstall ace-hf if it is missing)."
        )
    output_dir = Path(output_dir)
    if any(param.dtype != torch.float32 for param in encoder.parameters()):
        # Published weights are float32; convert a copy so the caller's model stays as it is.
        encoder = copy.deepcopy(encoder).float()
    encoder.save_pretrained(output_dir)
    _map_task_heads(output_dir / "config.json")
    image_processor.save_pretrained(output_dir)
    _check_remote_code(output_dir)
    _save_pretraining_heads(output_dir, pretraining_heads)

    model_id = model_id or output_dir.resolve().name
    base_model = base_model if _is_hub_id(base_model) else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=[*CARD_TAGS, encoder.config.backbone_type, *_data_tags(training_summary or {})],
        license=license,
        datasets=[name for name in dataset_names or [] if _is_hub_id(name)] or None,
        base_model=base_model,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_id=model_id,
        model_name=model_id.split("/")[-1],
        **_summary_facts(training_summary or {}),
        base_model=base_model,
        has_pretraining_heads=(output_dir / PRETRAINING_HEADS_NAME).is_file(),
        evaluation_section=_evaluation_section(evaluation_results),
        evaluation_start=EVALUATION_START,
        evaluation_end=EVALUATION_END,
        **_model_facts(encoder),
    )
    card.save(output_dir / "README.md")
    # safetensors writes 0600, so colleagues could not read the model; other files of the folder are not ours
    normal_file_permissions(output_dir, EXPORT_FILES)
    return output_dir


class HubPushError(RuntimeError):
    """A push to the Hub that cannot work, or that failed: the message says what to fix, in one line."""


def check_push_target(repo_id: str | None, token: str | None = None, *, api: HfApi | None = None) -> None:
    """Refuse now a push that would fail after hours of training: a `repo_id` that is no repository id, no
    token (`token`, else HF_TOKEN or the `hf auth login` one), a token the Hub refuses or that cannot write, or a
    Hub that does not answer within `HUB_CHECK_TIMEOUT_S` (offline, or HF_HUB_OFFLINE set).

    Raises:
        HubPushError: naming the option (--hub_model_id, --hub_token) and the fix.
    """
    if not repo_id:
        raise HubPushError("--push_to_hub needs --hub_model_id (namespace/name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"--hub_model_id {repo_id!r} is not a Hub repository id: {error}") from None
    token = token or get_token()
    if token is None:
        raise HubPushError(f"--push_to_hub needs a Hub token: {TOKEN_FIX}")
    try:
        user = _whoami_within(api or HfApi(token=token), token, HUB_CHECK_TIMEOUT_S)
    except (OSError, httpx.HTTPError) as error:
        refused = isinstance(error, HfHubHTTPError) and error.response.status_code == 401
        fix = TOKEN_FIX if refused else OFFLINE_FIX
        raise HubPushError(
            f"could not check the Hub token for --hub_model_id {repo_id} ({_short_cause(error)}); {fix}"
        ) from None
    if user.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubPushError(
            f"the Hub token of {user.get('name')} is read-only and cannot push to --hub_model_id {repo_id}; "
            f"create a write token at https://huggingface.co/settings/tokens, then {TOKEN_FIX}"
        )


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload ACE encoder",
    evaluation_results: str | os.PathLike | Mapping[str, Any] | None = None,
    api: HfApi | None = None,
) -> str:
    """Create the model repo `repo_id` ("namespace/name") if needed and upload `folder` as one commit.

    Only the folder's top-level files go up: an export is flat, and training writes checkpoints (optimizer
    state) and logs in subfolders next to it. `evaluation_results` (results.json of `ace-hf evaluate`,
    path or dict) first fills the model card's evaluation section, since evaluation usually runs after the
    export. Returns the commit URL. `api` is injectable so tests can record the calls instead of reaching the Hub.

    Raises:
        FileNotFoundError: `folder` holds no export.
        HubPushError: the upload failed; its one line says the folder is kept, and the command that uploads it.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; write it with export_pretrained first.")
    if evaluation_results is not None:
        add_evaluation_to_card(folder, evaluation_results)
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=[SUBFOLDER_FILES],
        )
    except (OSError, httpx.HTTPError) as error:
        raise HubPushError(
            f"pushing to --hub_model_id {repo_id} failed ({_short_cause(error)}); the model is safe in "
            f"{folder}: upload it later with `{upload_command(folder, repo_id, private=private)}`"
        ) from None
    return str(commit)


def upload_command(folder: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """The `hf upload` command line that uploads what push_to_hub would (the folder's top-level files)."""
    command = ["hf", "upload", repo_id, str(folder), ".", "--exclude", SUBFOLDER_FILES]
    return shlex.join([*command, "--private"] if private else command)


def add_evaluation_to_card(
    folder: str | os.PathLike, evaluation_results: str | os.PathLike | Mapping[str, Any]
) -> None:
    """Replace the evaluation section of the export's README.md with a table of `evaluation_results`."""
    readme = Path(folder) / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(EVALUATION_START) + r".*?" + re.escape(EVALUATION_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(
            f"{str(readme)!r} has no evaluation section; export it again with export_pretrained."
        )
    section = f"{EVALUATION_START}\n{_evaluation_section(evaluation_results)}\n{EVALUATION_END}"
    readme.write_text(pattern.sub(lambda _: section, text, count=1))


def find_pretraining_heads(
    name_or_path: str | os.PathLike, *, token: str | None = None, revision: str | None = None
) -> Path | None:
    """The pretraining_heads.safetensors of an export (a local folder or a Hub id), or None if it has none."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / PRETRAINING_HEADS_NAME
        return path if path.is_file() else None
    try:
        return Path(
            hf_hub_download(str(name_or_path), PRETRAINING_HEADS_NAME, token=token, revision=revision)
        )
    except EntryNotFoundError:  # not in the repo (or, offline, not in the cache)
        return None


def pretraining_model_from_export(
    name_or_path: str | os.PathLike,
    config: AceConfig | None = None,
    *,
    token: str | None = None,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> AceForPreTraining:
    """An `AceForPreTraining` that continues from an exported encoder, with the export's pretraining heads
    when it ships them and they fit `config`; otherwise the heads start fresh, and `log` says which it was."""
    encoder = AceModel.from_pretrained(name_or_path, config=config, token=token)
    heads_file = find_pretraining_heads(name_or_path, token=token)
    fresh = "expect the first epochs to re-learn them"
    if heads_file is None:
        log.warning(f"pretraining heads start fresh (no {PRETRAINING_HEADS_NAME} in {name_or_path}): {fresh}")
        return AceForPreTraining.from_encoder(encoder)
    try:
        model = AceForPreTraining.from_encoder(encoder, load_file(heads_file))
    except ValueError as error:
        log.warning(f"pretraining heads start fresh ({error}): {fresh}")
        return AceForPreTraining.from_encoder(encoder)
    log.info(f"loaded pretraining heads from {heads_file}")
    return model


def _save_pretraining_heads(
    folder: Path, heads: AceForPreTraining | Mapping[str, torch.Tensor] | None
) -> None:
    """Write the heads next to the encoder, or remove a stale heads file of an earlier export."""
    path = folder / PRETRAINING_HEADS_NAME
    if heads is None:
        path.unlink(missing_ok=True)
        return
    if isinstance(heads, AceForPreTraining):
        heads = heads.pretraining_heads_state_dict()
    save_file({key: value.contiguous() for key, value in heads.items()}, path, metadata={"format": "pt"})


def _map_task_heads(config_file: Path) -> None:
    """Add the task heads to config.json's `auto_map`, so that fine-tuning an export needs no `import ace_hf`."""
    config = json.loads(config_file.read_text())
    for head in TASK_HEADS:
        config["auto_map"][head._auto_class] = f"{head.__module__.rsplit('.', 1)[-1]}.{head.__name__}"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as save_pretrained does


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


def _whoami_within(api: HfApi, token: str, seconds: float) -> dict[str, Any]:
    """`api.whoami(token)`, given up after `seconds` (as a `TimeoutError`): huggingface_hub sets no timeout."""
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["user"] = api.whoami(token=token)
        except BaseException as error:  # handed to the caller's thread, which decides
            answer["error"] = error

    # A daemon thread: a request that hangs must not keep the process alive after the error.
    thread = threading.Thread(target=ask, name="hub-whoami", daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" in answer:
        raise answer["error"]
    if "user" not in answer:
        raise TimeoutError(f"no answer within {seconds:g} s")
    return answer["user"]


def _short_cause(error: BaseException) -> str:
    """The error's type and first line: huggingface_hub's messages go on with request ids and hints."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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


def _data_tags(summary: dict[str, Any]) -> list[str]:
    """Tags that describe the pretraining data; only the built-in data is known to be chest X-rays."""
    return ["chest-x-ray"] if str(summary.get("dataset", "")).startswith(BUILTIN_DATA_PREFIX) else []


def _summary_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """What the card says about the run: its table, its data (free of local paths), and whether the data is
    the built-in one-CT set or the run a smoke test."""
    dataset = summary.get("dataset")
    return {
        "training_rows": _summary_rows(summary),
        "data_description": _public_text(str(dataset)) if dataset is not None else None,
        "builtin_data": str(dataset).startswith(BUILTIN_DATA_PREFIX),
        "smoke_test": _smoke_test_note(summary),
    }


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: known keys first in SUMMARY_LABELS order, then any others as given."""
    keys = [key for key in SUMMARY_LABELS if key in summary] + [
        key for key in summary if key not in SUMMARY_LABELS
    ]
    return [(SUMMARY_LABELS.get(key, key), _format_value(key, summary[key])) for key in keys]


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {seconds:02d} s"


def _format_segments(segments: list[dict[str, Any]]) -> str:
    """One entry per resumed part of a run, with what was deliberately changed when it resumed."""
    parts = []
    for segment in segments:
        start, end = segment["steps"]
        text = f"steps {start}-{end} ({_format_duration(segment['wall_time_s'])})"
        if segment.get("changes"):
            text += ", resumed with " + ", ".join(
                f"{name} {old!r} -> {new!r}" for name, (old, new) in segment["changes"].items()
            )
        parts.append(text)
    return "; ".join(parts)


def _format_value(key: str, value: Any) -> str:
    if key == "wall_time_s" and isinstance(value, int | float):
        return _format_duration(value)
    if key == "segments" and isinstance(value, list):
        return _public_text(_format_segments(value))
    if key == "recipe" and isinstance(value, dict):
        return ", ".join(f"{name} {setting:g}" for name, setting in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return _public_text(str(value))


def _smoke_test_note(summary: dict[str, Any]) -> str | None:
    """Why the card must flag the run as a smoke test (too few steps, or fewer than planned), else None."""
    steps, planned = summary.get("steps"), summary.get("total_steps")
    if not isinstance(steps, int):
        return None
    if isinstance(planned, int) and steps < planned:
        return f"it stopped after {steps} of {planned} planned optimizer steps"
    if steps < SMOKE_TEST_STEPS:
        return f"it ran {steps} optimizer steps"
    return None


def _evaluation_section(results: str | os.PathLike | Mapping[str, Any] | None) -> str:
    """Markdown for the card's evaluation section: the suite's table, or how to produce one."""
    if results is None:
        return (
            "No evaluation results were attached to this export. `ace-hf evaluate` "
            'measures them, and `ace_hf.hub.push_to_hub(..., evaluation_results="results.json")` adds '
            "them here."
        )
    if not isinstance(results, Mapping):
        results = json.loads(Path(results).read_text())
    table = results_markdown({_public_text(name): result for name, result in results.items()})
    return (
        "ace-hf's evaluation suite (`ace-hf evaluate`): property analysis of the frozen embeddings "
        "and few-shot segmentation and findings classification, on held-out digitally reconstructed radiographs "
        "rendered from the chest CT of the built-in data (other poses and seed), with labels from the render "
        "geometry. These are synthetic images of one anatomy, not a clinical benchmark.\n\n" + table
    )


def _is_hub_id(name: str | None) -> bool:
    """A Hub repo id ("org/name") that is not also a local path: only such names go into a public card."""
    if not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


_PATH_PUNCTUATION = "()[]{}<>'\"`,;"


def _public_text(text: str) -> str:
    """`text` with each local path (absolute, home-relative, or existing here) cut to its last component."""
    return re.sub(r"\S+", lambda match: _public_word(match.group()), text)


def _public_word(word: str) -> str:
    path = word.strip(_PATH_PUNCTUATION)
    is_path = "/" in path or "\\" in path
    is_local = path.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:[\\/]", path) or Path(path).exists()
    if not (is_path and is_local):
        return word
    return word.replace(path, re.split(r"[\\/]", path.rstrip("/\\"))[-1] or "(local folder)")


__all__ = [
    "PRETRAINING_HEADS_NAME",
    "HubPushError",
    "add_evaluation_to_card",
    "check_push_target",
    "export_pretrained",
    "find_pretraining_heads",
    "pretraining_model_from_export",
    "push_to_hub",
    "upload_command",
]
