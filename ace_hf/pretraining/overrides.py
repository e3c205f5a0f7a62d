"""--config_overrides and --augmentation_overrides: read, applied and checked the way a pretraining run applies
them (the arguments check them before anything loads; the loop applies them)."""

from __future__ import annotations

import copy
import difflib

from ..configuration_ace import AceConfig
from ..image_processing_ace import PRETRAINING_SETTING_NAMES

# What an overridden config field of each type takes, in an error message.
VALUE_KINDS = {int: "an integer", float: "a number", str: "text"}


def overridden_config(config: AceConfig, text: str, validate: bool = True) -> AceConfig:
    """A copy of `config` with the --config_overrides `text` ('name=value,...') applied as the run applies them
    (`PretrainedConfig.update_from_string`), and, with `validate`, checked to build a working model; a
    ValueError naming the override otherwise."""
    config = copy.deepcopy(config)
    names = sorted(name for name in vars(config) if not name.startswith("_"))
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not (sep and name and value) or "=" in value:
            raise ValueError(
                f"--config_overrides: {item!r} is not name=value (items are separated by commas)"
            )
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--config_overrides: AceConfig has no field {name!r}{hint}")
        current = getattr(config, name)
        if not isinstance(current, bool | int | float | str):
            raise ValueError(
                f"--config_overrides: {name} cannot be overridden here (only number, true/false and text fields)"
            )
        try:
            config.update_from_string(item)
        except ValueError:
            kind = "true or false" if isinstance(current, bool) else VALUE_KINDS[type(current)]
            raise ValueError(f"--config_overrides: {item!r}: {name} takes {kind}") from None
    if validate:
        try:
            config.validate_ace()
        except ValueError as error:
            raise ValueError(f"--config_overrides {text}: {error}") from None
    return config


def parse_overrides(text: str | None) -> dict[str, float | tuple[float, float]]:
    """--augmentation_overrides 'a=0.2,b=1:2' -> {"a": 0.2, "b": (1.0, 2.0)}, refusing a field the image
    processor does not have; the processor checks the values."""
    overrides: dict[str, float | tuple[float, float]] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            numbers = tuple(float(part) for part in value.split(":"))
        except ValueError:
            raise ValueError(
                f"--augmentation_overrides: {item!r} is not key=number or key=low:high"
            ) from None
        overrides[key.strip()] = numbers[0] if len(numbers) == 1 else numbers
    unknown = sorted(set(overrides) - set(PRETRAINING_SETTING_NAMES))
    if unknown:
        raise ValueError(f"--augmentation_overrides: AceImageProcessor has no field(s) {', '.join(unknown)}")
    return overrides


__all__ = ["overridden_config", "parse_overrides"]
