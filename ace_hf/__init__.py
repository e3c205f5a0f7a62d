"""ace-hf: ACE self-supervised pretraining for medical images, as a Hugging Face model package.

`import ace_hf` loads nothing heavy: each name below is imported on first use, and the first use also registers
the ACE classes with transformers' Auto classes (`ace_hf.auto`), so that after `from ace_hf import AceModel`
`AutoModel.from_pretrained(folder)` works without `trust_remote_code`.
"""

from . import lazy as _lazy

__version__ = "0.1.0"

_EXPORTS = {
    "ACE_PRESETS": ".presets_ace",
    "AceConfig": ".configuration_ace",
    "AceForImageClassification": ".modeling_ace",
    "AceForPreTraining": ".modeling_ace",
    "AceForSemanticSegmentation": ".modeling_ace",
    "AceImageProcessor": ".image_processing_ace",
    "AceModel": ".modeling_ace",
    "AceModelOutput": ".modeling_ace",
    "AcePreTrainedModel": ".modeling_ace",
    "AcePreTrainingOutput": ".modeling_ace",
    "CorrespondenceTargets": ".correspondence_ace",
    "correspondence_targets": ".correspondence_ace",
    "register_auto_classes": ".auto",
    "sample_view_origins": ".correspondence_ace",
}

__all__ = sorted(_EXPORTS)


def _register() -> None:
    from .auto import register_auto_classes

    register_auto_classes()


__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS, on_first_use=_register)
