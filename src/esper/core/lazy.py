"""Package attributes that are imported on first use.

Why: some packages export names whose modules pull in heavy dependencies
(torch for kernels and seed slots, the whole control plane for the
supervisor's CLI). The control plane imports those packages for their light
names and must not pay for the heavy ones, so the heavy names are listed
with their modules and resolved by the package's module ``__getattr__``
(PEP 562) the first time someone asks, then cached in the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module holding it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__
