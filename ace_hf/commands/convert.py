"""`ace-hf convert`: a published ACE / DINO checkpoint (or a timm state dict) into a Hub-ready encoder folder.

ace-hf convert --checkpoint ace_swin_b.pth --output_dir ace-swin-b --model_preset ace-swin-b
ace-hf convert --checkpoint dino_vitb.pth --output_dir ace-vit-b --key teacher --unsafe_load
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..arguments import check_results_folder, parse_arguments, run_or_exit
from ..presets_ace import ACE_PRESETS

if TYPE_CHECKING:
    import torch

    from ..configuration_ace import AceConfig

logger = logging.getLogger(__name__)


@dataclass
class ConversionArguments:
    """Which checkpoint, which entry of it, and which architecture it holds."""

    checkpoint: str = field(metadata={"help": "ACE/DINO .pth, or a .safetensors state dict."})
    output_dir: str = field(metadata={"help": "Where to write the Hub-ready encoder folder."})
    model_preset: str | None = field(
        default=None,
        metadata={"help": "Default: ace-vit-b or ace-swin-b, as detected.", "choices": sorted(ACE_PRESETS)},
    )
    config: str | None = field(default=None, metadata={"help": "An AceConfig config.json (or its folder)."})
    key: str = field(
        default="auto",
        metadata={
            "help": "Checkpoint entry holding the encoder; auto: the first of ace_hf.convert.CHECKPOINT_KEYS "
            "(ACE's and DINO's teacher first) that the file has."
        },
    )
    unsafe_load: bool = field(
        default=False, metadata={"help": "Allow arbitrary pickled objects (trusted files)."}
    )
    model_id: str | None = field(
        default=None, metadata={"help": "Hub id ('org/name') the model card's snippets load."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an export already in --output_dir (refused otherwise)."}
    )

    def __post_init__(self) -> None:
        if self.model_preset and self.config:
            raise ValueError("--model_preset and --config are mutually exclusive")


def config_for(args: ConversionArguments, state_dict: Mapping[str, torch.Tensor]) -> AceConfig:
    """--config, else --model_preset, else the B-size preset of the detected backbone."""
    from ..configuration_ace import AceConfig
    from ..convert import detect_backbone

    if args.config:
        return AceConfig.from_pretrained(args.config)
    preset = args.model_preset or f"ace-{detect_backbone(state_dict)}-b"
    logger.info(f"Using the {preset!r} preset")
    return AceConfig.from_preset(preset)


def convert(args: ConversionArguments) -> Path:
    """Convert and export; returns the folder written."""
    # Imported here, not above: they load torch, which `--help` and argument mistakes need not wait for.
    from ..convert import ace_model_from_timm_state_dict, encoder_state_dict, load_checkpoint
    from ..hub import EXPORT_FILES, export_pretrained
    from ..image_processing_ace import AceImageProcessor

    check_results_folder(Path(args.output_dir), EXPORT_FILES, "--output_dir", args.overwrite_output_dir)
    logger.info(f"Reading {args.checkpoint}")
    state_dict = encoder_state_dict(load_checkpoint(args.checkpoint, args.unsafe_load), args.key)
    config = config_for(args, state_dict)
    logger.info(f"Converting {len(state_dict)} tensors into a {config.backbone_type} AceModel")
    encoder = ace_model_from_timm_state_dict(state_dict, config)
    output_dir = export_pretrained(
        encoder, AceImageProcessor.from_ace_config(encoder.config), args.output_dir, model_id=args.model_id
    )
    logger.info(f"Wrote the encoder and its image processor to {output_dir}")
    return output_dir


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the arguments and convert; a bad checkpoint is one `error:` line."""
    args = parse_arguments(ConversionArguments, argv, description=__doc__)
    logging.basicConfig(format="%(levelname)s - %(message)s", level=logging.INFO)
    return run_or_exit(lambda: convert(args), (ValueError, FileNotFoundError))  # OutputDirError too
