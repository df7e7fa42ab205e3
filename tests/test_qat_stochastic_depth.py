"""An int8 file must not draw random numbers: QAT captures in training mode, and timm's
stochastic depth (DropPath) tests ``self.training`` in Python, so it used to stay in the graph
(swin_tiny's int8 file scored 80.47% in one process, 81.25% in another)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compresspipe.compress.quant.onnx_int8 import export_onnx
from compresspipe.compress.quant.pt2e import convert, enable_train_eval, prepare_qat
from compresspipe.compress.quant.qdq import QDQScheme
from compresspipe.core.errors import CompressPipeError
from compresspipe.core.models import build_from_spec
from compresspipe.formats.export import random_nodes, refuse_random_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

# swin reduced through timm kwargs; drop_path_rate as high as it goes to make the draw visible
TINY_SWIN = {"source": "timm", "name": "swin_tiny_patch4_window7_224",
             "kwargs": {"img_size": 16, "window_size": 2, "embed_dim": 8, "depths": [1, 1],
                        "num_heads": [1, 2], "num_classes": 4, "in_chans": 1,
                        "drop_path_rate": 0.9}}


def test_qat_int8_file_of_a_stochastic_depth_model_is_deterministic(tmp_path):
    torch.manual_seed(0)
    model = build_from_spec(TINY_SWIN)
    assert any(getattr(m, "drop_prob", 0) > 0 for m in model.modules())
    x = torch.randn(8, 1, 16, 16)
    prepared = prepare_qat(model, x[:2], QDQScheme(qat=True))
    enable_train_eval(prepared)
    prepared.train()(x)  # observers see data, as in fine-tuning
    path = export_onnx(convert(prepared), x[:2], tmp_path / "model.int8.onnx", trim_taps=False)
    assert random_nodes(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runs = [session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    # the model handed in keeps its stochastic depth for later training stages
    assert any(getattr(m, "drop_prob", 0) > 0 for m in model.modules())


def test_a_file_that_draws_random_numbers_is_refused_with_its_nodes(tmp_path):
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    path = export_onnx(Noisy(), torch.randn(2, 3), tmp_path / "noisy.onnx", trim_taps=False)
    with pytest.raises(CompressPipeError, match=r"noisy\.onnx draws random numbers at "
                       r"inference \(.*RandomUniformLike\)"):
        refuse_random_nodes(path, "stage 'export'")
