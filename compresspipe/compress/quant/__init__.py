"""Quantization pieces: int8 through torchao PT2E deployed as ONNX (``qdq``, ``pt2e``,
``onnx_int8``, ``int8``), and Deep-Compression weight sharing (``cluster``).

Submodules import torch; this package itself imports nothing so stage modules stay light.
"""
