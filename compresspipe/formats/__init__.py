"""The files compresspipe writes: the ``.cpz`` container (``cpz/``) and its canonical Huffman
codes (``huffman/``), Deep Compression's entropy-coded stage, both pure numpy + stdlib; a model
to and from a .cpz (``cpz_model``) and the files other runtimes load (``export``), which use
torch. This package's namespace re-exports the container's API only (no torch).
"""

from __future__ import annotations

from . import cpz
from .cpz import *  # noqa: F403 - the container's API, as cpz/__init__.py lists it in __all__
from .huffman import HuffmanError

__all__ = [*cpz.__all__, "HuffmanError"]
