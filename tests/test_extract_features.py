"""ace_hf.features (examples/extract_features.py): features of a folder of images, in both formats, with unreadable
files skipped; each user mistake is one `error:` line before the model loads, earlier features are kept unless
--overwrite_output_dir, and the files written are readable by others.

`run_command` and `assert_one_error_line` check a command as the shell sees it; the visualization and evaluation
tests use them too."""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.numpy import load_file

from ace_hf import AceImageProcessor, AceModel
from ace_hf.arguments import ModelSourceError, check_model_source, parse_arguments, parse_size
from ace_hf.commands import main as ace_hf_command
from ace_hf.commands.extract_features import FeatureExtractionArguments, main
from ace_hf.features import extract_features, processor_overrides
from tests.conftest import EXAMPLES, tiny_vit_config

IMAGES = ["a.png", "sub/b.png", "sub/c16.png"]


def run_command(argv: Sequence[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`ace-hf ARGV` in process: its exit status and stderr as the shell would see them (a `sys.exit(message)`
    prints the message and exits with 1)."""
    try:
        status = ace_hf_command(list(argv))
    except SystemExit as exited:
        if isinstance(exited.code, str):
            print(exited.code, file=sys.stderr)
            status = 1
        else:
            status = exited.code or 0
    return status, capsys.readouterr().err


def assert_one_error_line(stderr: str, *expected: str) -> str:
    """Exactly one `error:` line (alone, or argparse's `PROG: error:` after its usage), holding each of
    `expected`, and no traceback; returns that line."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:") or ": error: " in line]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def parse_args(argv: list[str]) -> FeatureExtractionArguments:
    return parse_arguments(FeatureExtractionArguments, argv)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = tiny_vit_config()
    folder = tmp_path_factory.mktemp("model")
    AceModel(config).save_pretrained(folder)
    AceImageProcessor.from_ace_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8-bit grayscale, 8-bit RGB and 16-bit grayscale PNGs of different sizes, and a corrupt PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    PIL.Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(root / "a.png")
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "sub" / "b.png")
    PIL.Image.fromarray(rng.integers(0, 4096, (60, 44), dtype=np.uint16)).save(root / "sub" / "c16.png")
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def expected(model_dir: Path, image_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(global [C], patch [C, h, w]) per image from the model called directly, one image at a time."""
    model = AceModel.from_pretrained(model_dir).eval()
    processor = AceImageProcessor.from_pretrained(model_dir)
    features = {}
    with torch.no_grad():
        for name in IMAGES:
            outputs = model(**processor(image_dir / name, return_tensors="pt"))
            features[name] = (outputs.pooler_output[0].numpy(), outputs.patch_embeddings[0].numpy())
    return features


def run(model_dir: Path, image_dir: Path, output: Path, fmt: str, caplog: pytest.LogCaptureFixture) -> int:
    argv = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(output)]
    with caplog.at_level(logging.INFO):
        return main([*argv, "--format", fmt, "--batch_size", "2", "--device", "cpu"])


def assert_skip_reported(caplog: pytest.LogCaptureFixture) -> None:
    assert "Wrote features of 3 image(s)" in caplog.text
    assert "Skipped 1 unreadable file(s)" in caplog.text
    assert "broken.png" in caplog.text


def test_npy_features_mirror_the_folders_and_match_the_model(
    model_dir, image_dir, expected, tmp_path, caplog
):
    assert run(model_dir, image_dir, tmp_path, "npy", caplog) == 0

    written = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.npy"))
    assert written == sorted(f"{name}.{kind}.npy" for name in IMAGES for kind in ("global", "patch"))
    for name, (global_embedding, patch_map) in expected.items():
        saved_global, saved_patch = (np.load(tmp_path / f"{name}.{kind}.npy") for kind in ("global", "patch"))
        assert saved_global.shape == (32,) and saved_patch.shape == (32, 4, 4)
        np.testing.assert_allclose(saved_global, global_embedding, atol=1e-5)
        np.testing.assert_allclose(saved_patch, patch_map, atol=1e-5)
    assert_skip_reported(caplog)


def test_safetensors_features_and_index_match_the_model(model_dir, image_dir, expected, tmp_path, caplog):
    assert run(model_dir, image_dir, tmp_path, "safetensors", caplog) == 0

    features = load_file(tmp_path / "features.safetensors")
    index = json.loads((tmp_path / "features_index.json").read_text())
    assert (
        set(features) == set(index) == {f"{name}.{kind}" for name in IMAGES for kind in ("global", "patch")}
    )
    for name, (global_embedding, patch_map) in expected.items():
        assert index[f"{name}.global"] == index[f"{name}.patch"] == name
        assert features[f"{name}.global"].shape == (32,) and features[f"{name}.patch"].shape == (32, 4, 4)
        np.testing.assert_allclose(features[f"{name}.global"], global_embedding, atol=1e-5)
        np.testing.assert_allclose(features[f"{name}.patch"], patch_map, atol=1e-5)
    assert_skip_reported(caplog)


def test_size_and_resize_mode_reach_the_processor(model_dir, image_dir, tmp_path, caplog):
    args = FeatureExtractionArguments(
        model_name_or_path=str(model_dir),
        input=image_dir,
        output=tmp_path,
        size="48x64",
        resize_mode="pad",
        format="npy",
        device="cpu",
    )
    with caplog.at_level(logging.INFO):
        summary = extract_features(args)
    assert sorted(summary.written) == sorted(IMAGES) and len(summary.skipped) == 1
    model = AceModel.from_pretrained(model_dir).eval()
    processor = AceImageProcessor.from_pretrained(model_dir)
    for name in IMAGES:
        inputs = processor(image_dir / name, size={"height": 48, "width": 64}, resize_mode="pad")
        with torch.no_grad():
            expected = model(**inputs).patch_embeddings[0].numpy()
        saved = np.load(tmp_path / f"{name}.patch.npy")
        assert saved.shape == (32, 6, 8)  # 48 x 64 px at stride 8
        np.testing.assert_allclose(saved, expected, atol=1e-5)


@pytest.mark.parametrize(("text", "size"), [("40", 40), ("48x64", {"height": 48, "width": 64})])
def test_size_argument_forms(text: str, size, model_dir, image_dir, tmp_path) -> None:
    base = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    args = parse_args([*base, "--size", text])
    assert parse_size(args.size) == size and processor_overrides(args) == {"size": size}
    assert processor_overrides(parse_args(base)) == {}


def test_arguments_from_a_json_or_yaml_file(model_dir, image_dir, tmp_path) -> None:
    fields = {"model_name_or_path": str(model_dir), "input": str(image_dir), "output": str(tmp_path / "out")}
    (tmp_path / "args.json").write_text(json.dumps({**fields, "size": "48x64", "format": "safetensors"}))
    (tmp_path / "args.yaml").write_text("".join(f"{key}: {value}\n" for key, value in fields.items()))
    from_json = parse_args([str(tmp_path / "args.json")])
    assert from_json.input == image_dir and from_json.format == "safetensors"
    assert processor_overrides(from_json) == {"size": {"height": 48, "width": 64}}
    assert parse_args([str(tmp_path / "args.yaml")]) == FeatureExtractionArguments(**fields)


@pytest.mark.parametrize(
    "argv",
    [["--size", "0"], ["--size", "4x"], ["--size", "big"], ["--resize_mode", "fit"], ["--batch_size", "0"]],
)
def test_bad_size_or_mode_arguments_are_refused(argv, model_dir, image_dir, tmp_path) -> None:
    base = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    with pytest.raises(SystemExit):
        parse_args([*base, *argv])


def test_a_missing_input_is_refused_with_the_arguments(model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="--input .* does not exist"):
        FeatureExtractionArguments(str(model_dir), tmp_path / "missing", tmp_path / "out")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the weights fails the test: proves a check ran before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("ace_hf.features.AutoModel.from_pretrained", refuse)


@pytest.mark.parametrize(
    ("size", "nearest"),
    [("50", "48 or 56"), ("50x64", "48x64 or 56x64"), ("4", "8"), ("100x3", "96x8 or 104x8")],
)
def test_a_size_off_the_token_stride_is_one_error_line_before_the_model_loads(
    size, nearest, model_dir, image_dir, tmp_path, capsys, no_model_loads
) -> None:
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--input",
        str(image_dir),
        "--output",
        str(tmp_path / "out"),
    ]
    status, stderr = run_command(["extract-features", *argv, "--size", size, "--device", "cpu"], capsys)
    assert status == 1
    assert_one_error_line(
        stderr, f"error: --size {size} is not a multiple of the model's token stride 8", f"size is {nearest}"
    )


@pytest.mark.parametrize(
    "model", ["./missing-model", "{tmp}/missing-model", "missing-model", "~/no/such/model"]
)
def test_a_missing_local_model_is_a_usage_error_at_once(model, image_dir, tmp_path, capsys) -> None:
    """A value that reads as a local path (./, /, ~, an existing parent folder, not org/name) and is not there:
    argparse's usage and one error line naming the option, exit 2, before anything loads."""
    model = model.format(tmp=tmp_path)
    argv = ["extract-features", "--model_name_or_path", model, "--input", str(image_dir)]
    status, stderr = run_command([*argv, "--output", str(tmp_path / "out")], capsys)
    assert status == 2
    assert_one_error_line(stderr, "ace-hf extract-features: error: --model_name_or_path", model, "no such")
    assert not (tmp_path / "out").exists()


def test_a_model_source_reads_as_local_when_its_parent_folder_exists_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "outputs/run" is shaped like a Hub id, but outputs/ exists here: a missing local run, refused at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ModelSourceError, match="^--model_name_or_path outputs/run: no such file or folder$"):
        check_model_source("outputs/run", "--model_name_or_path")
    check_model_source("org/run", "--model_name_or_path")  # a Hub id: checked when it loads
    check_model_source(None, "--config_name")  # an option left out
    (tmp_path / "outputs" / "run").mkdir()
    check_model_source("outputs/run", "--model_name_or_path")


def test_a_hub_id_passes_the_argument_check(image_dir, tmp_path) -> None:
    args = parse_args(["--model_name_or_path", "org/ace-vit-b", "--input", str(image_dir), "--output", "x"])
    assert args.model_name_or_path == "org/ace-vit-b"


@pytest.mark.parametrize("kind", ["a file", "unwritable"])
def test_an_unusable_output_fails_in_one_line_before_the_model_loads(
    kind, model_dir, image_dir, tmp_path, capsys, no_model_loads
) -> None:
    output = Path("/proc/forbidden")
    if kind == "a file":
        output = tmp_path / "taken"
        output.write_text("x")
    argv = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(output)]
    status, stderr = run_command(["extract-features", *argv], capsys)
    assert status == 1
    assert_one_error_line(
        stderr, "error: --output", "is a file, not a folder" if kind == "a file" else "is not writable"
    )


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_earlier_features_are_kept_unless_overwrite_output_dir(
    fmt, model_dir, image_dir, tmp_path, capsys, caplog
) -> None:
    """A second extraction into the same --output is refused before the model loads; --overwrite_output_dir
    replaces the features."""
    assert run(model_dir, image_dir, tmp_path, fmt, caplog) == 0
    written = sorted(tmp_path.rglob("*"))
    argv = ["--model_name_or_path", str(model_dir), "--input", str(image_dir), "--output", str(tmp_path)]
    argv += ["--format", fmt, "--device", "cpu"]
    status, stderr = run_command(["extract-features", *argv], capsys)
    assert status == 1
    held = "a.png.global.npy" if fmt == "npy" else "features.safetensors"
    assert_one_error_line(stderr, f"error: --output {tmp_path} already holds earlier results", held)
    assert sorted(tmp_path.rglob("*")) == written
    assert run_command(["extract-features", *argv, "--overwrite_output_dir"], capsys)[0] == 0


def test_features_are_written_with_normal_permissions(model_dir, image_dir, tmp_path, caplog) -> None:
    """safetensors writes 0600; the features get the mode any new file gets here (0666 less the umask)."""
    assert run(model_dir, image_dir, tmp_path, "safetensors", caplog) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("features.safetensors", "features_index.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_script_smoke(model_dir, image_dir, tmp_path, monkeypatch) -> None:
    """examples/extract_features.py only parses and calls ace_hf.commands.extract_features.main: its flags and exit status."""
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--input",
        str(image_dir / "a.png"),
        "--output",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", ["extract_features.py", *argv, "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(EXAMPLES / "extract_features.py"), run_name="__main__")
    assert exited.value.code == 0
    assert (tmp_path / "a.png.global.npy").is_file() and (tmp_path / "a.png.patch.npy").is_file()


def test_a_folder_without_images_names_every_suffix_read_dicom_included(model_dir, tmp_path, caplog) -> None:
    """With pydicom installed (the [dicom] extra, in [dev]) .dcm files are images too: the message says so."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no image here")
    assert run(model_dir, tmp_path / "notes", tmp_path / "out", "npy", caplog) == 1
    assert "No images found at" in caplog.text and ".png" in caplog.text and ".dcm" in caplog.text
