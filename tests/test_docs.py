"""The docs run as printed, and their links lead somewhere.

Every ```python block of README.md and docs/*.md runs in a fresh process, in an empty folder with its own Hugging
Face cache and no network. An HTML comment on the line right above a block says what the block needs:

    <!-- setup: export -->          a tiny export in outputs/ace-pretrain and a chest_xray.png are there first
    <!-- argv: outputs/ace-pretrain 0 -->   the script's command-line arguments
    <!-- prints: outputs/ace-api 2 -->      the last line it prints
    <!-- slow -->                   runs only with `-m slow`

(items joined by `;` in one comment). A block that writes `output_dir="..."` must leave an export there.
Shell blocks are checked by tests/test_readme_commands.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ace_hf import AceModel
from ace_hf.hub import export_pretrained
from ace_hf.image_processing_ace import AceImageProcessor
from tests.conftest import tiny_vit_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
SETUPS = {"export"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Snippet:
    """One ```python block and what the comment above it says it needs."""

    path: Path
    line: int
    code: str
    setup: frozenset[str] = frozenset()
    argv: tuple[str, ...] = ()
    slow: bool = False
    notes: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_marker(text: str) -> dict[str, str]:
    """`slow; setup: export; argv: a b` -> {"slow": "", "setup": "export", "argv": "a b"}."""
    items = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, _, value = item.partition(":")
        items[key.strip()] = value.strip()
    return items


def python_snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, each with the marker on the line right above it."""
    lines = path.read_text().splitlines()
    snippets, number = [], 0
    while number < len(lines):
        if lines[number].strip() == "```python":
            end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
            marker = MARKER.match(lines[number - 1].strip()) if number else None
            items = parse_marker(marker.group(1)) if marker else {}
            snippets.append(
                Snippet(
                    path=path,
                    line=number + 1,
                    code="\n".join(lines[number + 1 : end]) + "\n",
                    setup=frozenset(items.get("setup", "").replace(",", " ").split()),
                    argv=tuple(shlex.split(items.get("argv", ""))),
                    slow="slow" in items,
                    notes=items,
                )
            )
            number = end
        number += 1
    return snippets


SNIPPETS = [snippet for path in DOCS for snippet in python_snippets(path)]


CASES = [
    pytest.param(snippet, id=snippet.name, marks=[pytest.mark.slow] if snippet.slow else [])
    for snippet in SNIPPETS
]


def test_every_marker_is_known() -> None:
    for snippet in SNIPPETS:
        assert set(snippet.notes) <= {"setup", "argv", "prints", "slow"}, snippet.name
        assert snippet.setup <= SETUPS, snippet.name


def prepare(folder: Path, setup: frozenset[str]) -> None:
    """What a reader has before a block with `setup: export` runs: an export and a radiograph."""
    if "export" in setup:
        torch.manual_seed(0)
        config = tiny_vit_config(patch_size=16, image_size=64)
        export_pretrained(
            AceModel(config).eval(),
            AceImageProcessor.from_ace_config(config),
            folder / "outputs" / "ace-pretrain",
        )
        rows, cols = np.mgrid[0:80, 0:72]
        PIL.Image.fromarray(((rows * 37 + cols * 11) % 4096).astype(np.uint16)).save(
            folder / "chest_xray.png"
        )


@pytest.mark.parametrize("snippet", CASES)
def test_snippet_runs_as_printed(snippet: Snippet, tmp_path: Path) -> None:
    prepare(tmp_path, snippet.setup)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", snippet.code, *snippet.argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"{snippet.name}:\n{result.stderr[-4000:]}"
    if "prints" in snippet.notes:
        assert result.stdout.strip().endswith(snippet.notes["prints"]), result.stdout[-2000:]
    for output_dir in re.findall(r'output_dir="([^"]+)"', snippet.code):
        assert (tmp_path / output_dir / "model.safetensors").is_file(), output_dir


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks)."""
    found, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(heading_anchor(line.lstrip("#")))
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_lead_to_files_and_headings_that_exist(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{path.name}: {target}"


def test_the_readme_is_a_front_page() -> None:
    """Short, an example early, no dated history (that is CHANGELOG.md's)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert lines.index("```python") < 40
    assert not [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]


def test_results_lead_with_what_we_learned() -> None:
    lines = (ROOT / "docs" / "results.md").read_text().splitlines()
    assert lines.index("## What we learned") < 60
