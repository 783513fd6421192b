"""What the infra tests share: the repository root and the names settings are read from."""

from __future__ import annotations

from pathlib import Path

from esper.core.settings import EsperSettings

REPO = Path(__file__).resolve().parents[2]


def setting_names() -> set[str]:
    """Every environment variable ``EsperSettings`` reads (each alias of each field)."""
    names = set()
    for field in EsperSettings.model_fields.values():
        alias = field.validation_alias
        names.update(getattr(alias, "choices", [alias]))
    return {str(n) for n in names if n}
