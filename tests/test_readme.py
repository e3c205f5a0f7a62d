"""The README's library snippet runs as printed (in a fresh process, with its own datasets cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a Markdown text."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_the_pretraining_api_snippet_runs(tmp_path: Path) -> None:
    (snippet,) = [block for block in python_blocks((ROOT / "README.md").read_text()) if "pretrain(" in block]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("outputs/ace-api 2")
    assert (tmp_path / "outputs" / "ace-api" / "model.safetensors").is_file()
