"""ace-hf: ACE self-supervised pretraining for medical images, as a Hugging Face model package.

Importing the package registers the ACE classes with transformers' Auto classes, so
`AutoModel.from_pretrained(folder)` works without `trust_remote_code` when ace_hf is installed.
"""

import transformers as _transformers

from .configuration_ace import ACE_PRESETS, AceConfig
from .correspondence_ace import CorrespondenceTargets, correspondence_targets, sample_view_origins
from .image_processing_ace import AceImageProcessor
from .modeling_ace import (
    AceForImageClassification,
    AceForPreTraining,
    AceForSemanticSegmentation,
    AceModel,
    AceModelOutput,
    AcePreTrainedModel,
    AcePreTrainingOutput,
)


def _register_auto_classes() -> None:
    """Register the ACE classes with transformers' Auto classes (a function, so that the package's namespace
    holds only its own names)."""
    auto = _transformers
    auto.AutoConfig.register("ace", AceConfig, exist_ok=True)
    auto.AutoModel.register(AceConfig, AceModel, exist_ok=True)
    auto.AutoModelForImageClassification.register(AceConfig, AceForImageClassification, exist_ok=True)
    auto.AutoModelForSemanticSegmentation.register(AceConfig, AceForSemanticSegmentation, exist_ok=True)
    auto.AutoImageProcessor.register(
        AceConfig, image_processor_classes={"torchvision": AceImageProcessor}, exist_ok=True
    )
    # "No video processor", as transformers records for its image-only models. Without it the
    # image-feature-extraction pipeline, which also looks for a video processor, derives "AceVideoProcessor" from
    # preprocessor_config.json's auto_map and asks "Do you wish to run the custom code? [y/N]" (15 s timeout) for
    # a class that does not exist.
    auto.AutoVideoProcessor.register(AceConfig, video_processor_classes={}, exist_ok=True)


_register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ACE_PRESETS",
    "AceConfig",
    "AceForImageClassification",
    "AceForPreTraining",
    "AceForSemanticSegmentation",
    "AceImageProcessor",
    "AceModel",
    "AceModelOutput",
    "AcePreTrainedModel",
    "AcePreTrainingOutput",
    "CorrespondenceTargets",
    "correspondence_targets",
    "sample_view_origins",
]
