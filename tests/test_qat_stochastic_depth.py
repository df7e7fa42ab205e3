"""An int8 model must not draw random numbers: QAT captures in training mode, and timm's
stochastic depth (DropPath) tests ``self.training`` in Python, so it used to stay in the graph
and in the int8 ONNX file exported from it (swin_tiny's int8 file scored 80.47% in one process,
81.25% in another). The graph is checked before export (the ONNX exporter takes seconds); the
file check that the qat and export stages run is tested on a small noisy module."""

from __future__ import annotations

import pytest
import torch

from compresspipe.compress.quant.onnx_int8 import export_onnx
from compresspipe.compress.quant.pt2e import convert, enable_train_eval, prepare_qat
from compresspipe.compress.quant.qdq import QDQScheme
from compresspipe.core.errors import CompressPipeError
from compresspipe.core.models import build_from_spec
from compresspipe.formats.export import refuse_random_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

# swin reduced through timm kwargs to one stage of two blocks (the second has stochastic depth)
TINY_SWIN = {"source": "timm", "name": "swin_tiny_patch4_window7_224",
             "kwargs": {"img_size": 8, "window_size": 2, "embed_dim": 8, "depths": [2],
                        "num_heads": [1], "num_classes": 4, "in_chans": 1,
                        "drop_path_rate": 0.9}}


def test_qat_int8_graph_of_a_stochastic_depth_model_is_deterministic():
    torch.manual_seed(0)
    model = build_from_spec(TINY_SWIN)
    assert any(getattr(m, "drop_prob", 0) > 0 for m in model.modules())
    x = torch.randn(8, 1, 8, 8)
    prepared = prepare_qat(model, x[:2], QDQScheme(qat=True))
    enable_train_eval(prepared)
    prepared.train()(x)  # observers see data, as in fine-tuning
    converted = convert(prepared)  # the graph the int8 ONNX file is exported from
    drawn = [str(n.target) for n in converted.graph.nodes
             if n.op == "call_function" and any(k in str(n.target) for k in ("bernoulli", "rand"))]
    assert drawn == []
    with torch.no_grad():
        runs = [converted(x) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
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
