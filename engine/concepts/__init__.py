"""Concept data sets for Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, CVPR 2017).

:func:`open_broden` reads any folder in the Broden layout; :func:`generate_concepts` writes the
built-in synthetic concept set (colours, shapes, textures) in that layout, offline.
"""

from .broden import Concept, ConceptDataset, ConceptError, ConceptSample, open_broden
from .generate import builtin_concepts, builtin_dir, generate_concepts

__all__ = [
    "Concept",
    "ConceptDataset",
    "ConceptError",
    "ConceptSample",
    "builtin_concepts",
    "builtin_dir",
    "generate_concepts",
    "open_broden",
]
