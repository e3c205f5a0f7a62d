"""What of checkpointing is pretraining's own: the disk a checkpoint of `AceForPreTraining` needs, and whole
weights under FSDP to export from. Writing and resolving checkpoints is shared with fine-tuning
(`ace_hf.checkpointing`, `ace_hf.runs`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..configuration_ace import AceConfig
from ..modeling_ace import AceForPreTraining


def checkpoint_bytes(config: AceConfig) -> int:
    """About what one checkpoint and the export take on disk: float32 student and teacher, AdamW's two moments
    of the trained weights, and the exported encoder (sized on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = AceForPreTraining(config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return 4 * (total + 2 * trained + sum(p.numel() for p in model.teacher.parameters()))


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP shards it into a DTensor (gathering is collective)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def whole_model(
    accelerator: Accelerator, model: torch.nn.Module, ace: AceForPreTraining
) -> AceForPreTraining | None:
    """The pretraining model with whole weights on the main process, None elsewhere, to export from. Under FSDP
    each process holds a shard of every weight, so all of them take part in gathering the state dict."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return ace if accelerator.is_main_process else None
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    whole = AceForPreTraining(ace.config)
    whole.load_state_dict(state_dict)
    return whole
