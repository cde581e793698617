"""Settings as one writes them on the command line: values (`as_override`) and dotted keys (`flatten`)."""
from __future__ import annotations

from typing import Any


def as_override(value: Any) -> str:
    """A value as one writes it on the command line: null, true, 0.5, [8,8,8], text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested settings under their dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
