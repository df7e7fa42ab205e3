"""Quantization pieces: int8 through torchao PT2E deployed as ONNX (``qdq``, ``fake_quant``,
``pt2e``, ``onnx_int8``, ``conv_taps``, ``int8``, with ``config``'s shared int8 options),
Deep-Compression weight sharing (``cluster``) and BatchNorm folding for smaller files
(``batchnorm``).

Submodules import torch (``qdq``, ``fake_quant`` and ``pt2e`` also torchao); this package itself
imports nothing.
"""
