"""The ACE classes registered with transformers' Auto classes, so that `AutoModel.from_pretrained(folder)` and
`pipeline(...)` load ACE folders without `trust_remote_code` where ace_hf is installed.

Runs when a name of `ace_hf` is first used (`from ace_hf import AceModel`) and wherever this package loads models
through the Auto classes; not at `import ace_hf`, which stays free of torch.
"""

from __future__ import annotations

import transformers

from .configuration_ace import AceConfig
from .image_processing_ace import AceImageProcessor
from .modeling_ace import AceForImageClassification, AceForSemanticSegmentation, AceModel


def register_auto_classes() -> None:
    """Register the ACE config, encoder, task heads and processor with the Auto classes (idempotent)."""
    transformers.AutoConfig.register("ace", AceConfig, exist_ok=True)
    transformers.AutoModel.register(AceConfig, AceModel, exist_ok=True)
    transformers.AutoModelForImageClassification.register(AceConfig, AceForImageClassification, exist_ok=True)
    transformers.AutoModelForSemanticSegmentation.register(
        AceConfig, AceForSemanticSegmentation, exist_ok=True
    )
    transformers.AutoImageProcessor.register(
        AceConfig, image_processor_classes={"torchvision": AceImageProcessor}, exist_ok=True
    )
    # "No video processor", as transformers records for its image-only models. Without it the
    # image-feature-extraction pipeline, which also looks for a video processor, derives "AceVideoProcessor" from
    # preprocessor_config.json's auto_map and asks "Do you wish to run the custom code? [y/N]" (15 s timeout) for
    # a class that does not exist.
    transformers.AutoVideoProcessor.register(AceConfig, video_processor_classes={}, exist_ok=True)
