"""The main job, end to end: `accelerate launch examples/pretrain.py` with no arguments (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_default_pretraining_runs_lowers_the_loss_and_exports_a_loadable_model(tmp_path: Path) -> None:
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
        "--mixed_precision", "no", str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [float(line.split("step ")[1].split("loss ")[1].split(",")[0]) for line in result.stderr.splitlines()
              if "] step " in line and ": loss " in line]  # fmt: skip
    assert len(losses) > 5 and losses[-1] < losses[0], losses
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["wall_time_s"] < 600

    child = (
        "import sys; sys.modules['ace_hf'] = None\n"
        "import numpy as np\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        f"model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True).eval()\n"
        f"processor = AutoImageProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)\n"
        "outputs = model(**processor(np.random.rand(300, 300).astype('float32'), return_tensors='pt'))\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        "print(tuple(outputs.pooler_output.shape), tuple(outputs.patch_embeddings.shape))\n"
    )
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    loaded = subprocess.run(
        [sys.executable, "-c", child], env=offline, capture_output=True, text=True, cwd=tmp_path
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert "(1, 192) (1, 192, 8, 8)" in loaded.stdout
