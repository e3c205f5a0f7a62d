"""Package attributes imported on first use (PEP 562), so that importing a package costs only what it runs.

`ace-hf SUBCOMMAND --help` and argument mistakes must answer before torch loads (3 s or more here): importing
`ace_hf`, `ace_hf.pretraining` or `ace_hf.finetuning` therefore imports none of their heavy modules until one of
their names is used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], on_first_use: Callable[[], None] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, which exports each name of `exports` from the module it maps
    to (relative to the package) and keeps it in the package's namespace; `on_first_use` runs once, before the
    first name is returned."""
    pending = [on_first_use] if on_first_use is not None else []

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        if pending:
            pending[0]()
            pending.clear()  # only once it has run: a failed hook is tried again on the next use
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
