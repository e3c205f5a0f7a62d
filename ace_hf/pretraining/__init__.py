"""ACE pretraining as a library: `pretrain(PretrainingArguments(...))`, its recipe, data, checkpoints and guards.

Each name below is imported on first use (`ace_hf.lazy`), so that `ace-hf pretrain --help` does not load torch.
Training-side package: never imported by the files that travel to the Hub.
"""

from .. import lazy as _lazy

_EXPORTS = {
    "OptimizationRecipe": ".recipe",
    "PretrainingArguments": ".arguments",
    "PretrainingRecipe": ".recipe",
    "PretrainingResult": ".loop",
    "pretrain": ".loop",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
