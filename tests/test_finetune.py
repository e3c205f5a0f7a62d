"""ace_hf.finetuning end to end on a tiny encoder and a handful of synthetic PNGs written to tmp_path; the
examples/finetune.py command line once, as docs/finetuning.md runs it; each user mistake of `ace-hf finetune` as one
`error:` line before the model loads; no run written over another's; resuming as if never interrupted."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

from ace_hf import AceConfig, AceImageProcessor, AceModel
from ace_hf.arguments import parse_arguments
from ace_hf.commands import main as ace_hf_command
from ace_hf.finetuning import FinetuningArguments, finetune, main
from ace_hf.finetuning import loop as finetuning_loop
from ace_hf.finetuning.arguments import TASK_SCORES, score_names
from ace_hf.finetuning.data import DataError, few_shot_indices
from ace_hf.finetuning.metrics import improved, task_metrics
from ace_hf.runs import OutputDirError, RunMismatchError, read_run_record
from tests.conftest import EXAMPLES
from tests.test_hub import FakeHfApi

SIZE = 32  # pixels per side of the synthetic images (the tiny encoder's input is 32 px too)


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Every test here runs on one intra-op thread (the CI machine's cores are shared)."""


def save_tiny_encoder(folder: Path) -> Path:
    """A tiny ACE encoder and its image processor, saved as a pretraining run exports them."""
    config = AceConfig.from_preset(
        "ace-vit-tiny",
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        view_tokens=4,
        grid_size=10,
        drop_path_rate=0.0,
    )
    AceModel(config).save_pretrained(folder)
    AceImageProcessor.from_ace_config(config).save_pretrained(folder)
    return folder


@pytest.fixture
def encoder_dir(tmp_path: Path) -> Path:
    return save_tiny_encoder(tmp_path / "encoder")


def _save(path: Path, brightness: float, rng: np.random.Generator) -> Path:
    """A grayscale PNG of the given mean brightness (0-255) with a little noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(brightness + 15 * rng.standard_normal((SIZE, SIZE)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _image_folder(root: Path, per_class: int) -> Path:
    """Two class folders whose images differ only in brightness: trivially learnable."""
    rng = np.random.default_rng(0)
    for name, brightness in (("bright", 200), ("dark", 50)):
        for index in range(per_class):
            _save(root / name / f"{index}.png", brightness, rng)
    return root


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _run(encoder_dir: Path, output_dir: Path, **options) -> dict:
    return finetune(
        FinetuningArguments(
            model_name_or_path=str(encoder_dir),
            output_dir=str(output_dir),
            learning_rate=3e-3,
            **{"num_train_epochs": 2, "per_device_train_batch_size": 4, **options},
        )
    )


def test_classification_from_an_image_folder_learns_and_saves_a_loadable_model(tmp_path, encoder_dir) -> None:
    data = _image_folder(tmp_path / "data", per_class=10)
    output = tmp_path / "out"
    results = _run(encoder_dir, output, train_dir=str(data), num_train_epochs=3)

    assert results["train_samples"] == 16 and results["eval_samples"] == 4  # 20 % held out, stratified
    assert results["train_samples_per_class"] == {"bright": 8, "dark": 8}
    assert results["accuracy"] >= 0.75 and results["balanced_accuracy"] >= 0.75
    assert 0.0 <= results["roc_auc"] <= 1.0  # two classes: binary ROC-AUC too
    saved = json.loads((output / "eval_results.json").read_text())
    assert saved["epoch"] == results["epoch"] and saved["accuracy"] == results["accuracy"]
    model = AutoModelForImageClassification.from_pretrained(output)
    assert model.config.id2label == {0: "bright", 1: "dark"}
    assert model.config.problem_type == "single_label_classification"
    assert (output / "preprocessor_config.json").is_file() and (output / "README.md").is_file()


def test_multi_label_from_a_csv_skips_and_counts_an_unreadable_image(tmp_path, encoder_dir) -> None:
    rng = np.random.default_rng(1)
    images = tmp_path / "csv" / "images"
    rows = []
    for index in range(10):
        effusion, nodule = index % 2, (index // 2) % 2
        _save(images / f"{index}.png", 50 + 150 * effusion, rng)
        rows.append({"path": f"images/{index}.png", "effusion": effusion, "nodule": nodule})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows.append({"path": "images/broken.png", "effusion": 1, "nodule": 1})
    train_csv = _write_csv(tmp_path / "csv" / "train.csv", rows[4:])
    validation_csv = _write_csv(tmp_path / "csv" / "validation.csv", rows[:4])
    output = tmp_path / "out"
    results = _run(
        encoder_dir,
        output,
        train_csv=str(train_csv),
        validation_csv=str(validation_csv),
        image_column="path",
        multi_label=True,
        label_columns="effusion,nodule",
        num_train_epochs=1,
    )

    assert results["skipped_images"] == 1 and results["train_samples"] == 6 and results["eval_samples"] == 4
    assert results["metric_for_best_model"] == "roc_auc" and math.isfinite(results["roc_auc"])
    assert set(results["per_label_roc_auc"]) == {"effusion", "nodule"}
    model = AutoModelForImageClassification.from_pretrained(output)
    assert model.config.problem_type == "multi_label_classification"
    assert list(model.config.id2label.values()) == ["effusion", "nodule"]


def test_segmentation_refuses_a_processor_that_would_misalign_masks(tmp_path, encoder_dir) -> None:
    """Masks are stretched to the input; a processor that pads or crops images would shift them."""
    AceImageProcessor.from_pretrained(encoder_dir, resize_mode="pad").save_pretrained(encoder_dir)
    csv_path = _write_csv(tmp_path / "train.csv", [{"image": "i.png", "mask": "m.png"}])
    with pytest.raises(ValueError, match="resize_mode is 'pad'"):
        _run(encoder_dir, tmp_path / "out", task="segmentation", train_csv=str(csv_path))


def test_segmentation_from_a_csv_of_image_and_mask_pngs(tmp_path, encoder_dir) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for index in range(6):
        mask = np.zeros((48, 48), dtype=np.uint8)  # masks larger than the model input: resized, nearest
        top = 8 + 4 * index
        mask[top : top + 16, 10:40] = 1
        mask[top + 16 :, 10:40] = 2
        mask[:2] = 255  # an ignored border
        image = 40 + 80 * (mask == 1) + 160 * (mask == 2) + 10 * rng.standard_normal(mask.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(tmp_path / f"image{index}.png")
        Image.fromarray(mask).save(tmp_path / f"mask{index}.png")
        rows.append({"image": f"image{index}.png", "mask": f"mask{index}.png"})
    train_csv = _write_csv(tmp_path / "train.csv", rows)
    output = tmp_path / "out"
    results = _run(
        encoder_dir, output, task="segmentation", train_csv=str(train_csv), validation_fraction=0.3
    )

    assert results["train_samples"] == 4 and results["eval_samples"] == 2
    assert math.isfinite(results["mean_iou"]) and 0.0 <= results["mean_iou"] <= 1.0
    # The new head's BatchNorm starts from zero mean / unit variance statistics, so eval mode is sane from
    # the first epoch (uninitialized running statistics once gave validation losses around 1e9).
    assert results["loss"] < 10
    assert set(results["per_category_iou"]) == {
        "class_0",
        "class_1",
        "class_2",
    }  # 255 is ignored, not a class
    model = AutoModelForSemanticSegmentation.from_pretrained(output)
    assert model.config.num_labels == 3 and model.config.semantic_loss_ignore_index == 255
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(1, 3, 32, 32)).logits
    assert logits.shape == (1, 3, 32, 32)


def test_the_readme_linear_probe_command_trains_the_head_only(tmp_path, encoder_dir) -> None:
    """examples/finetune.py as docs/finetuning.md runs it, in a fresh process: the frozen encoder comes out unchanged."""
    data = _image_folder(tmp_path / "data", per_class=4)
    output = tmp_path / "out"
    command = [
        sys.executable, str(EXAMPLES / "finetune.py"), "--model_name_or_path", str(encoder_dir),
        "--train_dir", str(data), "--freeze_encoder", "--learning_rate", "1e-3", "--output_dir", str(output),
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((output / "eval_results.json").read_text())["train_samples"] == 6

    before = AceModel.from_pretrained(encoder_dir).state_dict()
    after = AutoModelForImageClassification.from_pretrained(output)
    for key, value in after.ace.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shots_per_class_draws_exactly_k_examples_of_each_class(tmp_path, encoder_dir) -> None:
    data = _image_folder(tmp_path / "data", per_class=6)
    results = _run(encoder_dir, tmp_path / "out", train_dir=str(data), shots_per_class=2, num_train_epochs=1)

    assert results["train_samples_per_class"] == {"bright": 2, "dark": 2}
    assert results["train_samples"] == 4
    assert results["eval_samples"] == 3  # held out from all 12 images before the draw


def test_few_shot_draw_is_seeded_and_refuses_too_few_examples() -> None:
    labels = np.eye(2)[[0, 0, 0, 1, 1, 1, 1]]
    first = few_shot_indices(labels, ["a", "b"], 2, torch.Generator().manual_seed(0))
    again = few_shot_indices(labels, ["a", "b"], 2, torch.Generator().manual_seed(0))
    assert first == again and labels[first].sum(0).tolist() == [2, 2]
    with pytest.raises(ValueError, match="class 'a' has only 3"):
        few_shot_indices(labels, ["a", "b"], 4, torch.Generator().manual_seed(0))


def test_a_csv_naming_a_missing_file_or_column_or_a_bad_label_fails_clearly(tmp_path, encoder_dir) -> None:
    _save(tmp_path / "present.png", 100, np.random.default_rng(0))
    missing = _write_csv(
        tmp_path / "missing.csv",
        [{"image": "present.png", "label": "a"}, {"image": "absent.png", "label": "b"}],
    )
    with pytest.raises(DataError, match=r"line 3, column 'image': file .*absent\.png"):
        _run(encoder_dir, tmp_path / "out", train_csv=str(missing))
    no_label = _write_csv(tmp_path / "no_label.csv", [{"image": "present.png", "finding": "a"}])
    with pytest.raises(ValueError, match=r"no column\(s\) 'label'; its columns: \['image', 'finding'\]"):
        _run(encoder_dir, tmp_path / "out", train_csv=str(no_label))
    not_binary = _write_csv(tmp_path / "not_binary.csv", [{"image": "present.png", "effusion": "yes"}])
    with pytest.raises(ValueError, match="column 'effusion' holds 'yes'; it must be 0 or 1"):
        _run(
            encoder_dir,
            tmp_path / "out",
            train_csv=str(not_binary),
            multi_label=True,
            label_columns="effusion",
        )


def test_push_to_hub_uploads_the_best_model(tmp_path, encoder_dir, monkeypatch) -> None:
    api = FakeHfApi()
    monkeypatch.setattr("ace_hf.hub.HfApi", lambda token=None: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the push is checked before training
    data = _image_folder(tmp_path / "data", per_class=4)
    _run(
        encoder_dir,
        tmp_path / "out",
        train_dir=str(data),
        num_train_epochs=1,
        push_to_hub=True,
        hub_model_id="org/ace-finetuned",
    )

    [upload] = api.uploads
    assert upload["repo_id"] == "org/ace-finetuned"
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "eval_results.json",
        "README.md",
    } <= set(upload["files"])


def test_best_epoch_is_the_higher_score_then_the_lower_loss() -> None:
    best = {"roc_auc": 0.8, "loss": 0.5}
    assert improved(best, {}, "roc_auc")  # the first epoch is always saved
    assert improved({"roc_auc": 0.9, "loss": 0.9}, best, "roc_auc")
    assert improved({"roc_auc": 0.8, "loss": 0.4}, best, "roc_auc")
    assert not improved({"roc_auc": 0.8, "loss": 0.6}, best, "roc_auc")
    assert not improved({"roc_auc": math.nan, "loss": 0.1}, best, "roc_auc")
    assert improved({"roc_auc": 0.1, "loss": 0.9}, {"roc_auc": math.nan, "loss": 0.1}, "roc_auc")
    assert improved({"loss": 0.4}, best, "loss")  # a loss is minimized


@pytest.mark.parametrize(("task_kind", "num_labels"), [("classification", 2), ("classification", 3),
                                                     ("multi_label", 3), ("segmentation", 3)])  # fmt: skip
def test_the_declared_scores_are_the_ones_each_task_reports(task_kind, num_labels) -> None:
    """--metric_for_best_model is checked against `score_names` while parsing: it must name what `evaluate`
    reports (the validation loss and each scalar score), no more, no less."""
    generator = torch.Generator().manual_seed(0)
    names = [f"class_{index}" for index in range(num_labels)]
    if task_kind == "segmentation":
        outputs = torch.randint(0, num_labels, (4, 8, 8), generator=generator)
        references = torch.randint(0, num_labels, (4, 8, 8), generator=generator)
    elif task_kind == "multi_label":
        outputs, references = (
            torch.randn(8, num_labels, generator=generator),
            torch.eye(num_labels)[[0, 1] * 4],
        )
        references[:, 2] = torch.tensor([0, 1] * 4)
    else:
        outputs, references = torch.randn(8, num_labels, generator=generator), torch.arange(8) % num_labels
    scores = task_metrics(task_kind, outputs, references, names, ignore_index=255)
    reported = {name for name, value in scores.items() if isinstance(value, float)} | {"loss"}
    assert reported == set(score_names(task_kind, num_labels))
    assert set(score_names(task_kind, num_labels)) <= set(score_names(task_kind)) and set(TASK_SCORES) == {
        "classification",
        "multi_label",
        "segmentation",
    }


def test_contradictory_options_are_refused_before_any_data_is_read(capsys) -> None:
    with pytest.raises(ValueError, match="pass exactly one of --train_dir, --dataset_name, --train_csv"):
        FinetuningArguments(model_name_or_path="encoder")
    with pytest.raises(ValueError, match="--shots_per_class needs image-level classes"):
        FinetuningArguments(
            model_name_or_path="encoder", train_csv="masks.csv", task="segmentation", shots_per_class=5
        )
    # The command line says it as argparse says a wrong flag: usage, one error line, exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", "encoder", "--train_dir", "data", "--push_to_hub"])
    assert exit_info.value.code == 2
    assert "error: --push_to_hub needs --hub_model_id" in capsys.readouterr().err


def test_options_come_from_flags_or_from_one_json_or_yaml_file(tmp_path) -> None:
    encoder, data, masks = tmp_path / "encoder", tmp_path / "data", tmp_path / "masks.csv"
    encoder.mkdir(), data.mkdir(), masks.touch()  # paths are checked with the options
    flags = parse_arguments(
        FinetuningArguments,
        [
            "--model_name_or_path",
            str(encoder),
            "--train_dir",
            str(data),
            "--multi_label",
            "--label_columns",
            "a,b",
        ],
    )
    assert flags.multi_label and flags.task_kind == "multi_label" and flags.best_metric == "roc_auc"
    assert flags.ignore_index == 255 and flags.num_train_epochs == 10  # the defaults
    options = {"model_name_or_path": str(encoder), "train_csv": str(masks), "task": "segmentation"}
    (tmp_path / "options.json").write_text(json.dumps(options))
    (tmp_path / "options.yaml").write_text("".join(f"{key}: {value}\n" for key, value in options.items()))
    for path in (tmp_path / "options.json", tmp_path / "options.yaml"):
        parsed = parse_arguments(FinetuningArguments, [str(path)])
        assert parsed == FinetuningArguments(**options) and parsed.best_metric == "mean_iou"


# ------------------------------------------------------------------------- user mistakes: one line, exit 1 or 2


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the mistakes below start from: an encoder, 4 images per class, a CSV naming a missing file, masks
    with a class value 5, a file where a folder belongs, an empty folder and a folder holding another run's
    model."""
    root = tmp_path_factory.mktemp("mistakes")
    save_tiny_encoder(root / "encoder")
    _image_folder(root / "images", per_class=4)
    rng = np.random.default_rng(0)
    _save(root / "present.png", 100, rng)
    _write_csv(
        root / "missing.csv", [{"image": "present.png", "label": "a"}, {"image": "absent.png", "label": "b"}]
    )
    rows = []
    for index in range(3):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, SIZE // 2 :] = 5 if index == 2 else 1
        Image.fromarray(mask).save(root / f"mask{index}.png")
        rows.append({"image": "present.png", "mask": f"mask{index}.png"})
    _write_csv(root / "masks.csv", rows)
    (root / "a_file").touch()
    (root / "empty").mkdir()
    (root / "earlier_run").mkdir()
    for name in ("config.json", "model.safetensors"):
        (root / "earlier_run" / name).touch()
    return root


def finetune_refusal(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`ace-hf finetune argv` run in-process until it exits: its exit status and its one `error:` line, after
    checking that stderr holds no traceback and no other error line."""
    with pytest.raises(SystemExit) as exited:
        ace_hf_command(["finetune", *argv])
    status, stderr = exited.value.code, capsys.readouterr().err
    if isinstance(status, str):  # sys.exit(message): Python prints the message on stderr, status 1
        status, stderr = 1, stderr + status + "\n"
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert errors[0].startswith("error: " if status == 1 else "ace-hf finetune: error: "), stderr
    return status, errors[0]


# name -> (options after --model_name_or_path, exit status, what the error line names)
MISTAKES = {
    "too few shots": (
        ["--train_dir", "images", "--shots_per_class", "5"],
        1,
        ["--shots_per_class 5", "'bright'", "only 3"],
    ),
    "a csv row names a missing file": (
        ["--train_csv", "missing.csv"],
        1,
        ["--train_csv missing.csv", "line 3", "absent.png"],
    ),
    "a mask value without a class name": (
        ["--task", "segmentation", "--train_csv", "masks.csv", "--label_names", "background,lung"],
        1,
        ["mask2.png", "value 5", "--label_names"],
    ),
    "a missing train_dir": (["--train_dir", "nowhere"], 2, ["--train_dir", "nowhere"]),
    "an empty train_dir": (["--train_dir", "empty"], 1, ["--train_dir empty"]),
    "a missing train_csv": (["--train_csv", "nowhere.csv"], 2, ["--train_csv", "nowhere.csv"]),
    "a missing validation_csv": (
        ["--train_csv", "missing.csv", "--validation_csv", "nowhere.csv"],
        2,
        ["--validation_csv", "nowhere.csv"],
    ),
    "an unknown report_to": (["--train_dir", "images", "--report_to", "mlfow"], 2, ["--report_to", "mlfow"]),
    "an output_dir that is a file": (
        ["--train_dir", "images", "--output_dir", "a_file"],
        1,
        ["--output_dir", "a file"],
    ),
    "an output_dir holding another run": (
        ["--train_dir", "images", "--output_dir", "earlier_run"],
        1,
        ["--output_dir", "--overwrite_output_dir"],
    ),
    "a malformed size": (["--train_dir", "images", "--size", "big"], 2, ["--size", "big"]),
    "a size off the token stride": (["--train_dir", "images", "--size", "20"], 1, ["--size 20", "stride 8"]),
    "a missing checkpoint": (
        ["--train_dir", "images", "--resume_from_checkpoint", "nowhere"],
        2,
        ["--resume_from_checkpoint", "nowhere"],
    ),
    "an empty model_name_or_path": (
        ["--train_dir", "images", "--model_name_or_path", ""],
        2,
        ["--model_name_or_path is empty"],
    ),
    "an unknown metric_for_best_model": (
        ["--train_dir", "images", "--metric_for_best_model", "f1"],
        2,
        ["--metric_for_best_model 'f1'", "balanced_accuracy, accuracy, roc_auc, loss"],
    ),
    "another task's metric_for_best_model": (
        ["--task", "segmentation", "--train_csv", "masks.csv", "--metric_for_best_model", "accuracy"],
        2,
        ["--metric_for_best_model 'accuracy' is not a segmentation score", "mean_iou"],
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_one_error_line_before_the_model_loads(
    mistake, mistakes, capsys, monkeypatch
) -> None:
    options, status, named = MISTAKES[mistake]
    monkeypatch.chdir(mistakes)
    monkeypatch.setattr(finetuning_loop, "build_model", lambda *_: pytest.fail("the model loaded"))
    if "--output_dir" not in options:
        options = [*options, "--output_dir", "out"]
    refused_status, line = finetune_refusal(["--model_name_or_path", "encoder", *options], capsys)
    assert refused_status == status, line
    for name in named:
        assert name in line, line


@pytest.mark.parametrize("model", ["nowhere", "./nowhere", "images/encoder", "/no/such/encoder"])
def test_a_local_model_path_that_is_not_there_is_refused_at_once(
    model, mistakes, capsys, monkeypatch
) -> None:
    """Not a network failure after a minute: a value that can only be a local path is refused while parsing
    ("images/encoder" has the shape of a Hub id, but the folder images/ is here)."""
    monkeypatch.chdir(mistakes)
    status, line = finetune_refusal(["--model_name_or_path", model, "--train_dir", "images"], capsys)
    assert status == 2 and f"--model_name_or_path {model}" in line


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_a_tracker_that_is_not_installed_is_refused(mistakes, capsys) -> None:
    argv = ["--model_name_or_path", str(mistakes / "encoder"), "--train_dir", str(mistakes / "images")]
    status, line = finetune_refusal([*argv, "--report_to", "wandb"], capsys)
    assert status == 2 and "pip install wandb" in line


# ------------------------------------------------------- output folders, permissions and the new options


def test_a_finished_run_is_not_replaced_without_overwrite_and_its_files_are_readable(
    tmp_path, encoder_dir
) -> None:
    data = _image_folder(tmp_path / "data", per_class=4)
    output = tmp_path / "out"
    _run(encoder_dir, output, train_dir=str(data), num_train_epochs=1)
    umask = os.umask(0)
    os.umask(umask)
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "eval_results.json",
        "README.md",
    ):
        assert (output / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # safetensors alone wrote 0600

    with pytest.raises(OutputDirError, match="already holds another run's work"):
        _run(encoder_dir, output, train_dir=str(data), num_train_epochs=1)
    (output / "notes.txt").write_text("mine")
    results = _run(encoder_dir, output, train_dir=str(data), num_train_epochs=1, overwrite_output_dir=True)
    assert json.loads((output / "eval_results.json").read_text()) == results
    assert (output / "notes.txt").read_text() == "mine"  # only the earlier run's files go


def test_max_steps_overrides_epochs_and_size_sets_the_input(tmp_path, encoder_dir) -> None:
    """9 training images in batches of 4: 3 steps per epoch, so 5 steps are one epoch and 2 steps of a second;
    the fine-tuned model's processor keeps the 16 px input."""
    data = _image_folder(tmp_path / "data", per_class=6)
    output = tmp_path / "out"
    results = _run(encoder_dir, output, train_dir=str(data), max_steps=5, num_train_epochs=9, size="16")

    assert results["train_samples"] == 9 and results["step"] in (3, 5)
    [checkpoint] = (output / "checkpoints").iterdir()
    assert checkpoint.name == "step_5" and read_run_record(checkpoint)["state"]["epoch"] == 2
    saved = json.loads((output / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 16, "width": 16}


def test_report_to_tensorboard_logs_into_the_output_dir(tmp_path, encoder_dir, caplog) -> None:
    pytest.importorskip("tensorboard")
    data = _image_folder(tmp_path / "data", per_class=4)
    output = tmp_path / "out"
    with caplog.at_level("INFO"):
        _run(encoder_dir, output, train_dir=str(data), num_train_epochs=1, report_to="tensorboard")
    assert list((output / "ace-finetune").glob("events.out.tfevents.*"))
    assert f"Logging to tensorboard in {output / 'ace-finetune'}" in caplog.text


class Interrupted(Exception):
    """Stands for a crash (or Ctrl-C) during the second epoch."""


def test_a_resumed_run_ends_as_the_uninterrupted_run(tmp_path, encoder_dir, monkeypatch) -> None:
    data = _image_folder(tmp_path / "data", per_class=6)
    options = {"train_dir": str(data), "num_train_epochs": 2}
    uninterrupted = _run(encoder_dir, tmp_path / "uninterrupted", **options)

    train_epoch = finetuning_loop.train_epoch
    epochs = []

    def crash_in_the_second_epoch(*arguments):
        epochs.append(len(epochs) + 1)
        if len(epochs) == 2:
            raise Interrupted
        return train_epoch(*arguments)

    output = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(finetuning_loop, "train_epoch", crash_in_the_second_epoch)
        with pytest.raises(Interrupted):
            _run(encoder_dir, output, **options)
    with pytest.raises(RunMismatchError, match="different run.*batch_size: 4 -> 3"):
        _run(encoder_dir, output, **options, resume_from_checkpoint="latest", per_device_train_batch_size=3)

    assert _run(encoder_dir, output, **options, resume_from_checkpoint="latest") == uninterrupted
    assert [path.name for path in (output / "checkpoints").iterdir()] == ["step_6"]  # 3 steps per epoch
    weights = {
        folder: AutoModelForImageClassification.from_pretrained(folder).state_dict()
        for folder in (output, tmp_path / "uninterrupted")
    }
    for key, value in weights[output].items():
        assert torch.equal(value, weights[tmp_path / "uninterrupted"][key]), key


def test_roc_auc_as_the_best_metric_with_three_classes_is_refused_before_training(
    tmp_path, encoder_dir, capsys
) -> None:
    """ROC-AUC is computed for two classes only, which only the data tells: refused once it is read."""
    data = _image_folder(tmp_path / "data", per_class=8)
    for index in range(8):
        _save(data / "grey" / f"{index}.png", 120, np.random.default_rng(index))
    argv = [
        "--model_name_or_path",
        str(encoder_dir),
        "--train_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    status, line = finetune_refusal([*argv, "--metric_for_best_model", "roc_auc"], capsys)
    assert status == 1 and "--metric_for_best_model roc_auc: not computed for 3 labels" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()
