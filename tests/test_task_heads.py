"""Task heads: AceForImageClassification and AceForSemanticSegmentation compute transformers' losses, load a
pretrained ACE encoder, resolve through the Auto classes, and load as remote code without ace_hf (saved task
models, and task heads around a pretraining export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

from ace_hf import (
    AceConfig,
    AceForImageClassification,
    AceForPreTraining,
    AceForSemanticSegmentation,
    AceImageProcessor,
    AceModel,
)
from ace_hf.hub import export_pretrained
from tests.conftest import tiny_swin_config, tiny_vit_config
from tests.test_hub import BLOCK_ACE_HF, run_without_ace_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(batch: int = 4, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------------------


def test_classification_single_label_loss_is_cross_entropy() -> None:
    """Integer labels: cross-entropy of the logits (problem type inferred)."""
    model = AceForImageClassification(tiny_vit_config(num_labels=3)).eval()
    labels = torch.tensor([0, 2, 1, 2])
    outputs = model(pixel_values=pixels(), labels=labels)
    assert outputs.logits.shape == (4, 3)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))
    assert model(pixel_values=pixels()).loss is None


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_classification_multi_label_loss_is_binary_cross_entropy(problem_type: str | None) -> None:
    """Float 0/1 label vectors (inferred, or set in the config): BCE with logits, averaged."""
    model = AceForImageClassification(tiny_vit_config(num_labels=3, problem_type=problem_type)).eval()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    outputs = model(pixel_values=pixels(), labels=labels)
    torch.testing.assert_close(outputs.loss, F.binary_cross_entropy_with_logits(outputs.logits, labels))


@pytest.mark.parametrize("num_labels", [1, 2])
def test_classification_regression_loss_is_mean_squared_error(num_labels: int) -> None:
    """Regression (one target inferred from num_labels=1, or set in the config): MSE on the logits."""
    problem_type = "regression" if num_labels > 1 else None
    model = AceForImageClassification(
        tiny_vit_config(num_labels=num_labels, problem_type=problem_type)
    ).eval()
    labels = torch.randn(4, num_labels).squeeze(-1)
    outputs = model(pixel_values=pixels(), labels=labels)
    torch.testing.assert_close(outputs.loss, F.mse_loss(outputs.logits.squeeze(-1), labels))


def test_classification_loss_trains_encoder_and_head() -> None:
    """The loss reaches both the linear head and the encoder (fine-tuning, not only probing)."""
    model = AceForImageClassification(tiny_vit_config(num_labels=3))
    model(pixel_values=pixels(), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.ace.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_classifier_pooling_mean_and_cls_mean() -> None:
    """ "mean": the head sees pooler_output; "cls_mean" (ViT): the CLS token concatenated to it, twice the
    width; Swin has no CLS token, so AceConfig refuses it."""
    x = pixels()
    mean = AceForImageClassification(tiny_vit_config(num_labels=3)).eval()
    assert mean.classifier.in_features == mean.config.feature_dim
    with torch.no_grad():
        encoded = mean.ace(x)
        torch.testing.assert_close(mean(pixel_values=x).logits, mean.classifier(encoded.pooler_output))

    both = AceForImageClassification(tiny_vit_config(num_labels=3, classifier_pooling="cls_mean")).eval()
    assert both.classifier.in_features == 2 * both.config.feature_dim
    with torch.no_grad():
        encoded = both.ace(x)
        features = torch.cat([encoded.last_hidden_state[:, 0], encoded.pooler_output], dim=-1)
        torch.testing.assert_close(both(pixel_values=x).logits, both.classifier(features))

    with pytest.raises(ValueError, match="cls_mean"):
        tiny_swin_config(classifier_pooling="cls_mean")
    swin = AceForImageClassification(tiny_swin_config(num_labels=3)).eval()
    assert swin.classifier.in_features == swin.config.feature_dim
    assert swin(pixel_values=pixels()).logits.shape == (4, 3)


# ------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "size"), [(tiny_vit_config, (32, 48)), (tiny_swin_config, (32, 32))])
def test_segmentation_logits_are_upsampled_patch_logits(config, size: tuple[int, int]) -> None:
    """Logits [B, num_labels, H, W] at the input's size: the 1 x 1 head on the dense embeddings, upsampled
    bilinearly (non-square input for ViT)."""
    model = AceForSemanticSegmentation(config(num_labels=4)).eval()
    x = pixels(2, *size)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        patch_logits = model.classifier(model.ace(x).patch_embeddings)
    assert logits.shape == (2, 4, *size)
    assert patch_logits.shape[-2:] == (size[0] // 8, size[1] // 8)
    expected = F.interpolate(patch_logits, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_segmentation_loss_ignores_the_ignore_index(ignore_index: int) -> None:
    """Pixels labelled `semantic_loss_ignore_index` do not count: with all but two pixels ignored, the loss is
    the mean cross-entropy of those two pixels."""
    model = AceForSemanticSegmentation(
        tiny_vit_config(num_labels=4, semantic_loss_ignore_index=ignore_index)
    ).eval()
    labels = torch.full((2, 32, 32), ignore_index, dtype=torch.long)
    labels[1, 5, 7], labels[0, 30, 2] = 2, 3
    outputs = model(pixel_values=pixels(2), labels=labels)
    picked = torch.stack([outputs.logits[1, :, 5, 7], outputs.logits[0, :, 30, 2]])
    torch.testing.assert_close(outputs.loss, F.cross_entropy(picked, torch.tensor([2, 3])))


# ------------------------------------------------------------------------------------------------------------
# Loading a pretrained encoder, Auto classes
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[AceModel, Path]:
    torch.manual_seed(0)
    encoder = AceModel(tiny_vit_config())
    folder = tmp_path_factory.mktemp("encoder")
    encoder.save_pretrained(folder)
    return encoder, folder


@pytest.mark.parametrize(
    ("task_class", "auto_class"),
    [
        (AceForImageClassification, AutoModelForImageClassification),
        (AceForSemanticSegmentation, AutoModelForSemanticSegmentation),
    ],
)
def test_task_models_start_from_a_saved_encoder(encoder_folder, task_class, auto_class) -> None:
    """from_pretrained(encoder folder, num_labels=...), directly or through the Auto class: the encoder
    weights are the saved ones (every tensor), the head is new with num_labels outputs."""
    encoder, folder = encoder_folder
    expected = encoder.state_dict()
    for loader in (task_class, auto_class):
        task = loader.from_pretrained(folder, num_labels=5)
        assert type(task) is task_class
        assert task.config.num_labels == 5
        loaded = task.ace.state_dict()
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key
        head = task.classifier if task_class is AceForImageClassification else task.classifier[1]
        assert head.weight.shape[0] == 5


def test_auto_classes_resolve_to_the_task_heads() -> None:
    """After `import ace_hf`, the Auto classes map AceConfig to the ACE task heads."""
    assert type(AutoModelForImageClassification.from_config(tiny_vit_config(num_labels=2))) is (
        AceForImageClassification
    )
    assert type(AutoModelForSemanticSegmentation.from_config(tiny_vit_config(num_labels=2))) is (
        AceForSemanticSegmentation
    )
    assert AutoModelForImageClassification._model_mapping[AceConfig] is AceForImageClassification
    assert AutoModelForSemanticSegmentation._model_mapping[AceConfig] is AceForSemanticSegmentation


# ------------------------------------------------------------------------------------------------------------
# Remote code
# ------------------------------------------------------------------------------------------------------------

# A new process in which ace_hf cannot be imported: only the code saved next to the weights can load.
CHILD_SCRIPT = (
    BLOCK_ACE_HF
    + r"""
import numpy as np
import torch
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

classification, segmentation, inputs, out = sys.argv[1:5]
pixels = torch.from_numpy(np.load(inputs))
models = {
    "classification": AutoModelForImageClassification.from_pretrained(classification, trust_remote_code=True),
    "segmentation": AutoModelForSemanticSegmentation.from_pretrained(segmentation, trust_remote_code=True),
}
classes = {}
for name, model in models.items():
    with torch.no_grad():
        np.save(f"{out}/{name}.npy", model.eval()(pixel_values=pixels).logits.numpy())
    classes[name] = [type(model).__module__, type(model).__name__]
loaded = [name for name, module in sys.modules.items() if name.startswith("ace_hf") and module]
classes["ace_hf"] = sorted(loaded)
with open(f"{out}/classes.json", "w") as file:
    json.dump(classes, file)
"""
)


def test_task_models_load_as_remote_code_in_a_process_without_ace_hf(tmp_path: Path) -> None:
    """save_pretrained of each task model carries its code: the Auto class with trust_remote_code, offline,
    in a process where ace_hf cannot be imported, gives the same logits (the CLS + mean pooling setting and
    the BatchNorm running statistics travel too)."""
    torch.manual_seed(0)
    classifier = AceForImageClassification(
        tiny_vit_config(num_labels=3, classifier_pooling="cls_mean")
    ).eval()
    segmenter = AceForSemanticSegmentation(tiny_vit_config(num_labels=4)).eval()
    norm = segmenter.classifier[0]
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    classifier.save_pretrained(tmp_path / "classification")
    segmenter.save_pretrained(tmp_path / "segmentation")
    for folder in ("classification", "segmentation"):
        assert (tmp_path / folder / "modeling_ace.py").is_file()
    x = pixels(2)
    np.save(tmp_path / "pixels.npy", x.numpy())

    folders = [str(tmp_path / "classification"), str(tmp_path / "segmentation")]
    run_without_ace_hf(CHILD_SCRIPT, *folders, str(tmp_path / "pixels.npy"), str(tmp_path), work=tmp_path)

    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["classification"][1] == "AceForImageClassification"
    assert classes["segmentation"][1] == "AceForSemanticSegmentation"
    for name in ("classification", "segmentation"):
        assert classes[name][0].startswith("transformers_modules."), classes
    assert classes["ace_hf"] == []
    with torch.no_grad():
        expected = {
            "classification": classifier(pixel_values=x).logits,
            "segmentation": segmenter(pixel_values=x).logits,
        }
    for name, logits in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), logits.numpy(), atol=1e-5)


# Fine-tuning a pretraining export in a process without ace_hf: config.json's auto_map names the task heads.
EXPORT_CHILD_SCRIPT = (
    BLOCK_ACE_HF
    + r"""
import numpy as np
import torch
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

folder, inputs, out = sys.argv[1:4]
pixels = torch.from_numpy(np.load(inputs))
models = {
    "classification": AutoModelForImageClassification.from_pretrained(
        folder, num_labels=3, problem_type="multi_label_classification", trust_remote_code=True
    ),
    "segmentation": AutoModelForSemanticSegmentation.from_pretrained(folder, num_labels=4, trust_remote_code=True),
}
facts = {}
for name, model in models.items():
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
    np.savez(f"{out}/{name}_encoder.npz", **{key: value.numpy() for key, value in model.ace.state_dict().items()})
    facts[name] = {
        "class": [type(model).__module__, type(model).__name__],
        "logits": list(logits.shape),
        "problem_type": model.config.problem_type,
    }
facts["ace_hf"] = sorted(name for name, module in sys.modules.items() if name.startswith("ace_hf") and module)
with open(f"{out}/facts.json", "w") as file:
    json.dump(facts, file)
"""
)


def test_task_heads_load_from_a_pretraining_export_in_a_process_without_ace_hf(tmp_path: Path) -> None:
    """`AutoModelFor{ImageClassification,SemanticSegmentation}.from_pretrained(export, num_labels=...,
    trust_remote_code=True)` without ace_hf installed: the task head around the exported encoder's weights
    (every tensor), with a new head that runs."""
    torch.manual_seed(0)
    pretraining = AceForPreTraining(tiny_vit_config())
    encoder = pretraining.export_teacher()
    folder = export_pretrained(
        encoder,
        AceImageProcessor.from_ace_config(encoder.config),
        tmp_path / "export",
        pretraining_heads=pretraining,
    )
    np.save(tmp_path / "pixels.npy", pixels(2).numpy())
    run_without_ace_hf(
        EXPORT_CHILD_SCRIPT, str(folder), str(tmp_path / "pixels.npy"), str(tmp_path), work=tmp_path
    )

    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts.pop("ace_hf") == []
    assert facts["classification"]["class"][1] == "AceForImageClassification"
    assert facts["classification"]["problem_type"] == "multi_label_classification"
    assert facts["classification"]["logits"] == [2, 3]
    assert facts["segmentation"]["class"][1] == "AceForSemanticSegmentation"
    assert facts["segmentation"]["logits"] == [2, 4, 32, 32]
    expected = encoder.state_dict()
    for name in ("classification", "segmentation"):
        assert facts[name]["class"][0].startswith("transformers_modules."), facts
        loaded = np.load(tmp_path / f"{name}_encoder.npz")
        assert set(loaded.files) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=f"{name}: {key}")
