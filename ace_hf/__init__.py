"""ace-hf: ACE self-supervised pretraining for medical images, as a Hugging Face model package.

Importing the package registers the ACE classes with transformers' Auto classes, so
`AutoModel.from_pretrained(folder)` works without `trust_remote_code` when ace_hf is installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_ace import ACE_PRESETS, AceConfig
from .correspondence_ace import CorrespondenceTargets, correspondence_targets, sample_view_origins
from .image_processing_ace import AceImageProcessor
from .modeling_ace import (
    AceForPreTraining,
    AceModel,
    AceModelOutput,
    AcePreTrainedModel,
    AcePreTrainingOutput,
)

AutoConfig.register("ace", AceConfig, exist_ok=True)
AutoModel.register(AceConfig, AceModel, exist_ok=True)
AutoImageProcessor.register(
    AceConfig, image_processor_classes={"torchvision": AceImageProcessor}, exist_ok=True
)

__version__ = "0.1.0"

__all__ = [
    "ACE_PRESETS",
    "AceConfig",
    "AceForPreTraining",
    "AceImageProcessor",
    "AceModel",
    "AceModelOutput",
    "AcePreTrainedModel",
    "AcePreTrainingOutput",
    "CorrespondenceTargets",
    "correspondence_targets",
    "sample_view_origins",
]
