"""Run a script under Accelerate's FSDP on CPU processes (gloo), for tests only.

PyTorch's FSDP2 runs on CPU with gloo, but Accelerate turns FSDP on only for accelerator devices: with
`ACCELERATE_USE_CPU` it keeps `MULTI_CPU` (DDP) and ignores the FSDP plugin. This shim lifts that one gate, so
that Accelerate's own FSDP code (`prepare`, `save_state`/`load_state`, `get_state_dict`, gradient clipping)
runs around the training script exactly as it would on GPUs. Usage, under torchrun with Accelerate's FSDP
environment variables: `python tests/fsdp_on_cpu.py SCRIPT ARGS...`.
"""

import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType

_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # Later AcceleratorState() calls copy the shared PartialState fields over their own.
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
