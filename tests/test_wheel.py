"""The installed package, as a user gets it from `pip install ace-hf`: a wheel built from this checkout, installed
(not editable) into an isolated folder, run from outside the repository.

The wheel must carry what the library needs at run time (the model-card template, the offline metric scripts) and
the `ace-hf` entry point; `ace-hf pretrain` must train on the built-in data and export a folder that loads in a
process that cannot import ace_hf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_hub import BLOCK_ACE_HF

ROOT = Path(__file__).resolve().parent.parent

# Loads the export through the Auto classes and remote code only, and says where the classes came from.
LOAD_WITHOUT_ACE_HF = (
    BLOCK_ACE_HF
    + r"""
import torch
from transformers import AutoImageProcessor, AutoModel

folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    outputs = model(**processor(torch.rand(1, 64, 64), return_tensors="pt"))
print(json.dumps({"module": type(model).__module__, "finite": bool(outputs.pooler_output.isfinite().all())}))
"""
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout, as `pip wheel . --no-deps` builds it."""
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheelhouse,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = wheelhouse.glob("ace_hf-*.whl")
    return built


def test_the_wheel_carries_the_template_the_metrics_and_the_command(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ace_hf/templates/ace_model_card.md" in names
    assert {
        f"ace_hf/metrics/{name}.py" for name in ("accuracy", "balanced_accuracy", "mean_iou", "roc_auc")
    } <= names
    assert {"ace_hf/pretraining/loop.py", "ace_hf/commands/__init__.py", "ace_hf/synthetic/ct.py"} <= names
    assert not [name for name in names if name.startswith(("tests/", "examples/", "benchmarks/"))]
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "ace-hf = ace_hf.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_command_pretrains_outside_the_repo_and_exports_a_loadable_encoder(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "work"  # outside the repository: nothing of the checkout is on the path
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    where = subprocess.run(
        [sys.executable, "-c", "import ace_hf; print(ace_hf.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    # The README's command, on 16 renders instead of 300 (rendering them is the slow part).
    command = [site / "bin" / "ace-hf", "pretrain", "--max_steps", "2", "--output_dir", "run"]
    small = ["--default_num_images", "16", "--per_device_train_batch_size", "4"]
    trained = subprocess.run(
        [*command, *small], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert json.loads((work / "run" / "training_summary.json").read_text())["steps"] == 2

    env.pop("PYTHONPATH")
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_ACE_HF, str(work / "run")],
        cwd=work,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["finite"], result
