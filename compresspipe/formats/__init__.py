"""Entropy coding of compressed tensors (Deep Compression's third stage) and the .cpz container.

Pure numpy + stdlib: nothing here knows about torch or training.
"""

from __future__ import annotations

from . import cpz
from .cpz import *  # noqa: F403 - the container's API, as cpz/__init__.py lists it in __all__
from .huffman import HuffmanError

__all__ = [*cpz.__all__, "HuffmanError"]
