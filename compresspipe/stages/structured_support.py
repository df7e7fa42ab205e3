"""What both structured stages (``channel_prune``, ``pas``) do around their algorithm.

Before: check a model against a stage's ``ignore`` patterns and build its dependency graph
(``check_graph``), refuse a quantized artifact, trace the graph at the data's input shape and
keep a dense copy (``stage_start``). After: store the narrowed structure in the spec, log
parameters, MACs and latency before and after, record the layer widths and draw them
(``record_result``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..compress.structured.graph import StructuredGraph
from ..core import artifact_keys
from ..core.artifact import Artifact
from ..core.config import DataConfig
from ..core.errors import CompressPipeError
from ..core.measure import compare_latency, count_macs
from ..core.models import build_from_spec
from ..core.structure import CONV, describe_structure, widths
from ..tracking.plots import widths_plot
from .context import StageContext
from .patterns import unmatched_pattern_problems


def base_model(spec: dict[str, Any]) -> nn.Module:
    """The unpruned architecture of a spec (random weights): the reference for descriptions."""
    return build_from_spec({k: v for k, v in spec.items() if k != "structure"})


def layer_widths(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """Output width of every conv/linear layer (and head count of every attention layer),
    kept against the base architecture, in model order."""
    base_modules = dict(base.named_modules())
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (*CONV, nn.Linear)) and name in base_modules:
            rows.append({"layer": name, "kept": widths(m)["out"],
                         "total": widths(base_modules[name])["out"]})
        elif hasattr(m, "num_heads") and name in base_modules and name:
            rows.append({"layer": f"{name} (heads)", "kept": int(m.num_heads),
                         "total": int(base_modules[name].num_heads)})
    return rows


def input_shape_of(data_cfg: DataConfig) -> tuple[int, int, int, int]:
    """(1, channels, size, size): the shape MACs are counted for and graphs are traced with."""
    return (1, data_cfg.dataset_channels(), data_cfg.image_size, data_cfg.image_size)


def check_graph(model: nn.Module, data_cfg: DataConfig, ignore: Sequence[str],
                what: str = "pruned",
                **graph_kwargs) -> tuple[StructuredGraph | None, list[tuple[str, str]]]:
    """The dependency graph a structured stage would work on, or the validation problems
    (``ignore`` patterns that match nothing, a layer the graph cannot handle, no group left)."""
    problems = unmatched_pattern_problems(model, ignore, "ignore", kind="module")
    if problems:
        return None, problems
    try:
        graph = StructuredGraph(model, input_shape_of(data_cfg), ignore, **graph_kwargs)
    except CompressPipeError as exc:  # names the layer the model cannot be pruned at
        return None, [("ignore", str(exc))]
    if not graph.groups:
        return None, [("ignore", _no_groups(graph, what))]
    return graph, []


# reasons every network has (the classifier, what the file ignores): not worth a note
_EXPECTED = ("is the classifier", "produces the model output", "is ignored")


def plan_notes(stage: str, graph: StructuredGraph, plan: str = "") -> list[str]:
    """What ``validate`` says about a structured stage's dry run: how many channel groups can
    be narrowed, which keep their width and why, and the ``ignore:`` patterns that say so in
    the file (the stage keeps those widths on its own; the patterns make it explicit)."""
    kept = {name: why for name, why in graph.skipped.items()
            if not any(e in why for e in _EXPECTED)}
    head = (f"stage {stage!r}: {len(graph.groups)} channel groups can be narrowed"
            + (f"; {plan}" if plan else ""))
    if not kept:
        return [head]
    lines = [f"{head}; {len(kept)} keep their width:"]
    lines += [f"    {name}: {why}" for name, why in kept.items()]
    patterns = ", ".join(repr(n) for n in kept)
    lines.append(f"    to state it in the file: ignore: [{patterns}]")
    return ["\n".join(lines)]


def _no_groups(graph: StructuredGraph, what: str) -> str:
    return (f"no channel group of the model can be {what}: "
            + "; ".join(f"{k}: {v}" for k, v in graph.skipped.items()))


def stage_start(artifact: Artifact, ctx: StageContext, stage: str, ignore: Sequence[str],
                what: str = "pruned", **graph_kwargs
                ) -> tuple[nn.Module, tuple[int, ...], nn.Module, StructuredGraph]:
    """Where both structured stages start: the model on the device, the traced input shape, a
    dense copy (the MACs and latency reference) and the dependency graph."""
    require_unquantized(artifact, stage)
    model = artifact.model.to(ctx.device)
    shape = input_shape_of(ctx.view.data)
    dense = copy.deepcopy(model).eval()
    graph = StructuredGraph(model, shape, ignore, **graph_kwargs)
    if not graph.groups:
        raise CompressPipeError(f"stage {stage!r}: {_no_groups(graph, what)}")
    return model, shape, dense, graph


def require_unquantized(artifact: Artifact, stage: str) -> None:
    """Structured pruning narrows float layers; a quantized artifact must be pruned earlier."""
    if artifact.quant:
        raise CompressPipeError(f"stage {stage!r}: the incoming model is quantized; run "
                                "structured pruning before quantization")


def record_result(artifact: Artifact, ctx: StageContext, dense: nn.Module,
                  shape: Sequence[int], latency, info: dict[str, Any]) -> dict[str, float]:
    """Store the structure in the spec, log params/MACs/latency, write the widths plot.

    ``dense`` is the incoming model (for the before/after numbers and the latency ratio,
    measured in the same process, interleaved); ``latency`` a LatencyConfig or None.
    """
    model = artifact.model
    base = base_model(artifact.spec).to(next(model.parameters()).device)
    artifact.spec = {**artifact.spec, "structure": describe_structure(model, base)}
    before, after = count_macs(dense, shape), count_macs(model, shape)
    metrics = {"macs": after["macs"], "macs_before": before["macs"],
               "macs_reduction": before["macs"] / max(after["macs"], 1),
               "params_before": before["params"], "params_after": after["params"]}
    if latency is not None:
        for batch in latency.batch_sizes:
            times = compare_latency({"dense": dense, "pruned": model}, shape, batch=batch,
                                    repeats=latency.repeats, rounds=latency.rounds,
                                    threads=latency.threads)
            metrics[f"latency_b{batch}_ms"] = 1000 * times["pruned"]
            metrics[f"latency_b{batch}_before_ms"] = 1000 * times["dense"]
            metrics[f"speedup_b{batch}"] = times["dense"] / times["pruned"]
    ctx.log_metrics(metrics, None)
    rows = layer_widths(model, base)
    record = {**info, **metrics, "layer_widths": rows,
              "latency_threads": latency.threads if latency is not None else None}
    artifact_keys.add_structured(artifact, ctx.spec.name, record)
    title = (f"{ctx.spec.name}: {before['macs'] / 1e6:.2f}M -> {after['macs'] / 1e6:.2f}M MACs, "
             f"{before['params']:,} -> {after['params']:,} params")
    artifact.outputs["layer_widths.png"] = lambda path: widths_plot(rows, path, title)
    return metrics
