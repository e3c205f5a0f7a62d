"""The named ACE presets and the label value segmentation ignores: plain data, so that command-line help and
argument checks can name the presets without loading torch.

This file travels to the Hub as remote code (configuration_ace.py imports it): it imports only the standard
library.
"""

from __future__ import annotations

from typing import Any

# Label value that segmentation losses and metrics ignore (unlabelled or padded pixels): the usual 255.
IGNORE_INDEX = 255

# Named presets. "ace-vit-b" and "ace-swin-b" are the published ACE-B models at 448 px; "ace-vit-tiny"
# is a small ViT that pretrains in minutes on a 2-core CPU (96 px views, 6 x 6 tokens: a step costs 0.65 of an
# 8 x 8 step, and the extra steps show as few-shot segmentation gains; see docs/results.md).
ACE_PRESETS: dict[str, dict[str, Any]] = {
    "ace-vit-b": {},
    "ace-swin-b": {
        "backbone_type": "swin",
        "patch_size": 4,
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
        "window_size": 7,
        "drop_path_rate": 0.2,  # the official Swin-B config's
        # ACE's Swin builds every LayerNorm with eps 1e-6 (Microsoft's and timm's ImageNet Swins use 1e-5).
        "layer_norm_eps": 1e-6,
        "patch_layer_norm_eps": 1e-6,
    },
    "ace-vit-tiny": {
        "image_size": 96,
        "patch_size": 16,
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "view_tokens": 6,
        "grid_size": 20,
        "dino_hidden_dim": 512,
        "dino_bottleneck_dim": 128,
        "dino_out_dim": 4096,
        "position_embedding_init": "sincos",
        # A fifth of ACE's 0.1: at 10 minutes the DINO loss pulls cross-radiograph matching down (docs/results.md).
        "global_loss_weight": 0.02,
    },
}
