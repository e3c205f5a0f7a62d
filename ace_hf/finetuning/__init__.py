"""Fine-tuning (or linear probing) of an ACE encoder on labelled images, as a library: `FinetuningArguments` holds
every option, `finetune(args)` runs one Accelerate loop for classification (single- and multi-label) and semantic
segmentation, and `main(argv)` is the command line of both (examples/finetune.py).

Training-side package: never imported by the files that travel to the Hub.
"""

from .arguments import FinetuningArguments
from .cli import main
from .loop import finetune

__all__ = ["FinetuningArguments", "finetune", "main"]
