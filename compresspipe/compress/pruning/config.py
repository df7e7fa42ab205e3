"""The ``prune`` stage's config: method, criterion, scope, granularity, the (re)training loop
and each method's own block (gmp, dsd, bimp), with the rules on which combine.

It lives with the algorithm (as in torchao) so that the pruning methods need nothing from the
stage layer; ``compresspipe.stages.prune`` re-exports it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...core.config import StrictModel, TrainConfig
from ..distill.config import DistillConfig

Method = Literal["oneshot", "imp", "lth", "bimp", "gmp", "dsd", "at_init"]
Criterion = Literal["magnitude", "random", "snip", "grasp", "synflow", "wanda"]
Retrain = Literal["ft", "lrw", "wr", "slr", "clr", "llr", "allr"]
EdgePolicy = Literal["include", "exclude", "half"]
AllocationRule = Literal["uniform", "global", "erk", "lamp", "sensitivity"]
MAGNITUDE_ONLY = ("gmp", "bimp", "dsd")


class GMPConfig(StrictModel):
    """Zhu & Gupta's gradual schedule, in epochs of the stage's training."""

    start_epoch: float = Field(0.0, ge=0, description="t0: first mask update.")
    end_epoch: float | None = Field(None, gt=0, description="t0 + nΔt; default 3/4 of epochs.")
    frequency: int = Field(10, ge=1, description="Δt: optimizer steps between mask updates.")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i.")


class DSDConfig(StrictModel):
    """Han et al. (2017): the sparse phase uses ``train``; re-dense retrains at lr × lr_factor."""

    sparse_epochs: int = Field(4, ge=1)
    redense_epochs: int = Field(4, ge=1)
    lr_factor: float = Field(0.1, gt=0, le=1)


class BIMPConfig(StrictModel):
    """Zimmer et al. (2023): one total budget; dense phase first, the rest split over rounds."""

    total_epochs: int = Field(ge=2, description="T: the whole run's epochs.")
    dense_epochs: int = Field(ge=1, description="T0 < T: dense training epochs.")

    @model_validator(mode="after")
    def _fits(self) -> BIMPConfig:
        if self.dense_epochs >= self.total_epochs:
            raise ValueError(f"dense_epochs ({self.dense_epochs}) must be below total_epochs "
                             f"({self.total_epochs})")
        return self


class AllocationConfig(StrictModel):
    """How one global target is split over the layers (see compress/pruning/allocation.py)."""

    rule: AllocationRule = Field(
        description="uniform (same sparsity per layer), global (one ranking of all weights), "
        "erk (Erdős–Rényi-Kernel densities), lamp (layer-adaptive magnitude scores, one "
        "threshold), sensitivity (equal validation-loss increase, from a sensitivity stage).")
    scan: str | None = Field(
        None, description="sensitivity: 'stage:NAME' of the sensitivity stage whose scan to use "
        "(default: the scan the incoming model carries).")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data):
        return {"rule": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _scan_needs_rule(self) -> AllocationConfig:
        if self.scan is not None and self.rule != "sensitivity":
            raise ValueError(f"scan applies to rule 'sensitivity', not {self.rule!r}")
        if self.scan is not None and not self.scan.startswith("stage:"):
            raise ValueError(f"scan names a stage as 'stage:NAME', found {self.scan!r}")
        return self


# no docstring: it would become the JSON schema's description, which stays as it was
class PruneConfig(StrictModel):
    method: Method = "oneshot"
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="Target fraction of participating weights set to zero "
        "(default 0.9; for N:M it is 1 − N/M)."
    )
    criterion: Criterion = "magnitude"
    scope: Literal["global", "layer"] = "global"
    granularity: str = Field("unstructured", description="'unstructured' or 'N:M', e.g. '2:4'.")
    include: list[str] = Field(default_factory=list, description="Weight-name patterns to prune "
                               "(default: every Conv/Linear weight).")
    exclude: list[str] = Field(default_factory=list, description="Weight-name patterns to spare.")
    first_layer: EdgePolicy = "include"
    classifier: EdgePolicy = "include"
    overrides: dict[str, float] = Field(default_factory=dict,
                                        description="Pattern -> the sparsity those layers "
                                        "reach at the target (iterative methods approach it at "
                                        "the pace of the overall schedule).")
    allocation: AllocationConfig | None = Field(
        None, description="Split the global target over the layers by a rule (uniform, "
        "global, erk, lamp, sensitivity), hitting it exactly; a name or {rule, scan}. "
        "Default: the scope's own split.")
    min_layer_keep: float = Field(
        0.01, ge=0, lt=1, description="Every layer keeps at least this fraction of its weights "
        "(at least one): guards against layer collapse. 0 disables it.")
    recalibrate_bn: int = Field(
        100, ge=0, description="After every training phase, recompute BatchNorm running "
        "statistics as the exact average over this many training batches (0: keep the moving "
        "averages). At high sparsity channels cut off from the input feed BatchNorm constants "
        "with near-zero variance, where the moving averages' residue of earlier weights "
        "is amplified into chance-level evaluation.")
    rounds: int = Field(1, ge=1, le=100, description="Prune-retrain rounds (imp, lth, bimp).")
    retrain: Retrain | None = Field(None, description="LR schedule after each prune step; "
                                    "default allr (wr for lth). ft retrains at the dense "
                                    "schedule's last LR, which is ~0 after a cosine decay.")
    rewind_to: Literal["recorded", "init"] = Field(
        "recorded", description="Weight rewinding target: the point an earlier train stage "
        "recorded (record_rewind), or the pipeline's initial weights.")
    control: bool = Field(False, description="lth: also train the same mask from a fresh "
                          "random initialisation and log its accuracy.")
    score_batches: int = Field(4, ge=1, description="Batches for snip, grasp and wanda.")
    synflow_rounds: int = Field(100, ge=1, le=10_000)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gmp: GMPConfig = Field(default_factory=GMPConfig)
    dsd: DSDConfig = Field(default_factory=DSDConfig)
    bimp: BIMPConfig | None = None
    distill: DistillConfig | None = Field(None, description="Distil from a teacher while "
                                          "retraining (joint pruning + KD).")

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)) <= 64:
            raise ValueError(f"expected 'unstructured' or 'N:M' with 0 < N < M ≤ 64, found {v!r}")
        return v

    @field_validator("overrides")
    @classmethod
    def _override_range(cls, v: dict[str, float]) -> dict[str, float]:
        for pattern, s in v.items():
            if not 0 <= s < 1:
                raise ValueError(f"sparsity for {pattern!r} must be in [0, 1), found {s}")
        return v

    @model_validator(mode="after")
    def _combination(self) -> PruneConfig:
        m = self.method
        if m in MAGNITUDE_ONLY and self.criterion != "magnitude":
            raise ValueError(f"method {m!r} prunes by magnitude; criterion {self.criterion!r} "
                             "applies to oneshot, imp or at_init")
        if m == "lth" and self.retrain not in (None, "wr"):
            raise ValueError(f"lth always rewinds weights (retrain 'wr'); for {self.retrain!r} "
                             "use method imp")
        if m == "bimp" and self.bimp is None:
            raise ValueError("method 'bimp' needs a 'bimp' block with total_epochs and dense_epochs")
        if m != "bimp" and self.bimp is not None:
            raise ValueError(f"a 'bimp' block only applies to method 'bimp', not {m!r}")
        if self.rounds > 1 and m not in ("imp", "lth", "bimp"):
            raise ValueError(f"rounds apply to imp, lth and bimp, not {m!r}")
        if self.control and m != "lth":
            raise ValueError("the random re-initialisation control applies to method 'lth'")
        if self.criterion in ("snip", "grasp", "synflow") and m not in ("oneshot", "at_init"):
            raise ValueError(f"criterion {self.criterion!r} scores weights at initialisation; "
                             f"use it with method at_init (or oneshot), not {m!r}")
        if self.allocation is not None and (self.scope == "layer"
                                            or self.granularity != "unstructured"):
            raise ValueError("allocation splits one global target of unstructured sparsity: "
                             "use it with scope 'global' and granularity 'unstructured'")
        if self.granularity != "unstructured":
            n, mm = (int(x) for x in self.granularity.split(":"))
            if self.scope == "global":
                raise ValueError("N:M sparsity is set per block of M weights: use scope 'layer'")
            if m in ("gmp", "dsd", "bimp", "imp", "lth"):
                raise ValueError(f"N:M granularity supports oneshot and at_init, not {m!r}")
            if self.sparsity is not None and abs(self.sparsity - (1 - n / mm)) > 1e-9:
                raise ValueError(f"{self.granularity} means sparsity {1 - n / mm:g}; "
                                 f"found {self.sparsity}")
        return self

    def target_sparsity(self) -> float:
        """The overall sparsity the method reaches (N:M fixes it to 1 − N/M)."""
        if self.granularity != "unstructured":
            n, m = (int(x) for x in self.granularity.split(":"))
            return 1 - n / m
        return 0.9 if self.sparsity is None else self.sparsity

    def retrain_kind(self) -> str:
        """The LR schedule after each prune step, with its per-method default."""
        return self.retrain or ("wr" if self.method == "lth" else "allr")
