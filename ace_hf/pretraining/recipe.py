"""The pretraining recipe: every number that says how an ACE encoder is trained, in one object.

The optimization half (learning rate, weight decay, warm-up, epochs, clipping, last-layer freeze) is declared
here, per preset; the method half (teacher momentum, temperatures, loss weights) is declared in `AceConfig`,
because the model's forward reads it and config.json must record it. `PretrainingRecipe.resolve` joins the two;
the loop's schedules, the run fingerprint, the training summary (and so the model card) and the benchmark all
read the joined recipe, so no number is written twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..configuration_ace import AceConfig
from ..optimization import AceSchedules, scaled_learning_rate

# The config fields that belong to the recipe (the rest of AceConfig is architecture and view geometry).
METHOD_FIELDS = (
    "teacher_momentum",
    "teacher_momentum_end",
    "teacher_temperature",
    "warmup_teacher_temperature",
    "warmup_teacher_temperature_epochs",
    "student_temperature",
    "global_loss_weight",
    "local_loss_weight",
)


@dataclass(frozen=True, kw_only=True)
class OptimizationRecipe:
    """ACE's published optimization (Zhou et al., WACV 2025, arXiv 2501.10131); the learning rate is for a global batch of 256."""

    learning_rate: float = 5e-4
    min_learning_rate: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    warmup_epochs: float = 10.0
    num_train_epochs: int = 300
    max_grad_norm: float = 0.8
    freeze_last_layer_epochs: float = 1.0


# Presets whose recipe departs from the published one. The CPU-sized preset is trained for 10 minutes, where a
# higher rate and a short warm-up are what learns (docs/results.md).
PRESET_OPTIMIZATION: dict[str, OptimizationRecipe] = {
    "ace-vit-tiny": OptimizationRecipe(learning_rate=2e-3, warmup_epochs=5.0, num_train_epochs=54),
}
OPTIMIZATION_FIELDS = tuple(field.name for field in fields(OptimizationRecipe))


def optimization_for(preset: str) -> OptimizationRecipe:
    """The optimization recipe a preset trains with (the published one unless the preset departs from it)."""
    return PRESET_OPTIMIZATION.get(preset, OptimizationRecipe())


@dataclass(frozen=True)
class PretrainingRecipe:
    """The whole recipe of one run: its optimization and the config's method settings."""

    optimization: OptimizationRecipe
    method: dict[str, Any]

    @classmethod
    def resolve(
        cls, preset: str, config: AceConfig, overrides: dict[str, Any] | None = None
    ) -> PretrainingRecipe:
        """The preset's optimization with `overrides` (the arguments the user set; None = the preset's),
        joined with `config`'s method settings."""
        given = {name: value for name, value in (overrides or {}).items() if value is not None}
        optimization = replace(optimization_for(preset), **given)
        return cls(optimization, {name: getattr(config, name) for name in METHOD_FIELDS})

    def as_dict(self) -> dict[str, Any]:
        """Flat name -> value, for the training summary and the model card."""
        return {**asdict(self.optimization), **self.method}

    def schedules(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> AceSchedules:
        """The step-indexed schedules of this recipe for a run of `total_steps` (warm-up capped at the run)."""
        opt = self.optimization
        return AceSchedules(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            learning_rate=scaled_learning_rate(opt.learning_rate, global_batch),
            min_learning_rate=opt.min_learning_rate,
            warmup_epochs=min(opt.warmup_epochs, total_steps / steps_per_epoch),
            weight_decay=opt.weight_decay,
            weight_decay_end=opt.weight_decay_end,
            teacher_momentum=self.method["teacher_momentum"],
            teacher_momentum_end=self.method["teacher_momentum_end"],
            teacher_temperature=self.method["teacher_temperature"],
            warmup_teacher_temperature=self.method["warmup_teacher_temperature"],
            warmup_teacher_temperature_epochs=self.method["warmup_teacher_temperature_epochs"],
            freeze_last_layer_epochs=opt.freeze_last_layer_epochs,
        )


__all__ = [
    "METHOD_FIELDS",
    "OPTIMIZATION_FIELDS",
    "PRESET_OPTIMIZATION",
    "OptimizationRecipe",
    "PretrainingRecipe",
    "optimization_for",
]
