"""What the int8 stages share: the weight scheme, the deployed file's geometry, latency timing."""

from __future__ import annotations

from pydantic import (
    Field,
)

from ...core.config import StrictModel


class KeepFloat(StrictModel):
    """Mixed precision: layers too sensitive to int8 stay in floating point."""

    sensitivity_threshold: float = Field(
        gt=0, le=100, description="Validation top-1 drop (points) when only that layer is int8 "
        "above which the layer stays float.")
    max_batches: int = Field(8, ge=1, le=100_000,
                             description="Validation batches the per-layer int8 scan evaluates.")


class Int8Options(StrictModel):
    """What the int8 stages (``ptq``, ``qat``) share: the weight scheme, the deployed file's
    geometry and the latency measurement."""

    per_channel: bool = Field(True, description="Per-output-channel weight scales (else per tensor).")
    symmetric_activations: bool = Field(
        False, description="int8 activations with zero point 0 (else uint8 with a zero point).")
    trim_padding_taps: bool = Field(
        True, description="Drop convolution kernel taps that, at the model's fixed input size, "
        "only ever read zero padding (a 3x3 conv on a 1x1 feature map becomes 1x1): the same "
        "outputs bit for bit, fewer bytes, and onnxruntime's int8 kernels do not spend time on "
        "them. The windows are recorded in the file's metadata.")
    latency_repeats: int = Field(
        10, ge=0, le=10_000, description="Timed runs for the int8-vs-fp32 latency metrics (0: skip).")
    latency_threads: int = Field(1, ge=1, le=1024, description="CPU threads for those timings.")
    keep_float: KeepFloat | None = Field(
        None, description="Mixed precision: measure each conv/linear layer alone in int8 on "
        "the validation split and keep those whose top-1 drop passes the threshold in float "
        "(reported per layer).")
