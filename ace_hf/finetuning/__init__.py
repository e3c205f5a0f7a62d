"""Fine-tuning (or linear probing) of an ACE encoder on labelled images, as a library: `FinetuningArguments` holds
every option, `finetune(args)` runs one Accelerate loop for classification (single- and multi-label) and semantic
segmentation, and `main(argv)` is the command line of both (examples/finetune.py).

Each name below is imported on first use (`ace_hf.lazy`), so that `ace-hf finetune --help` does not load torch.
Training-side package: never imported by the files that travel to the Hub.
"""

from .. import lazy as _lazy

_EXPORTS = {"FinetuningArguments": ".arguments", "finetune": ".loop", "main": ".cli"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
