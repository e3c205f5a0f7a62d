"""ACE pretraining as a library: `pretrain(PretrainingArguments(...))`, its recipe, data, checkpoints and guards.

Training-side package: never imported by the files that travel to the Hub.
"""

from .arguments import PretrainingArguments
from .loop import PretrainingResult, pretrain
from .recipe import OptimizationRecipe, PretrainingRecipe

__all__ = ["OptimizationRecipe", "PretrainingArguments", "PretrainingRecipe", "PretrainingResult", "pretrain"]
