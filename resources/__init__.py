"""ConvLens's static files, read through :mod:`importlib.resources` so an installed wheel finds them.

- ``icon.svg``: the application and window icon;
- ``style.qss``: the application style sheet (message colours only);
- ``imagenet_classes.txt``: the 1000 ImageNet-1k class names in index order, used for
  torchvision architectures with 1000 outputs when the user gives no class names.

Nothing here imports Qt or torch.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["data", "imagenet_classes", "text"]


def data(name: str) -> bytes:
    """The bytes of resource ``name`` (a file of this package)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def text(name: str) -> str:
    return data(name).decode("utf-8")


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index 0 first (comment lines skipped)."""
    names = tuple(ln for ln in text("imagenet_classes.txt").splitlines() if ln and not ln.startswith("#"))
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names
