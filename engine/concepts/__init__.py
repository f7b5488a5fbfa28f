"""Concept data sets for Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, CVPR 2017).

:func:`open_broden` reads any folder in the Broden layout; :func:`generate_concepts` writes the
built-in synthetic concept set (colours, shapes, textures) in that layout, offline.

The names load on first use (PEP 562), so ``import engine.concepts`` for the defaults below
costs nothing (``convlens --help`` reads them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: images of the built-in concept set unless the user says otherwise (app and command line)
BUILTIN_DEFAULT_IMAGES = 2000
#: their side in pixels
BUILTIN_DEFAULT_SIZE = 112

_WHERE = {
    "Concept": "broden",
    "ConceptDataset": "broden",
    "ConceptError": "broden",
    "ConceptSample": "broden",
    "open_broden": "broden",
    "builtin_concepts": "generate",
    "builtin_dir": "generate",
    "generate_concepts": "generate",
}

if TYPE_CHECKING:  # the same names for type checkers, imported eagerly
    from .broden import Concept as Concept
    from .broden import ConceptDataset as ConceptDataset
    from .broden import ConceptError as ConceptError
    from .broden import ConceptSample as ConceptSample
    from .broden import open_broden as open_broden
    from .generate import builtin_concepts as builtin_concepts
    from .generate import builtin_dir as builtin_dir
    from .generate import generate_concepts as generate_concepts

__all__ = [
    "BUILTIN_DEFAULT_IMAGES",
    "BUILTIN_DEFAULT_SIZE",
    "Concept",
    "ConceptDataset",
    "ConceptError",
    "ConceptSample",
    "builtin_concepts",
    "builtin_dir",
    "generate_concepts",
    "open_broden",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
