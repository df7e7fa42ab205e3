"""The built-in pruning methods, one module each; importing this package registers them all.

oneshot (prune once, retrain), imp (rounds at 1 − (1 − s)^(1/n)), lth (IMP with weight
rewinding and an optional random re-initialisation control), bimp (one epoch budget, ALLR
retraining), gmp (Zhu & Gupta's cubic schedule during training), dsd (dense → sparse →
re-dense) and at_init (SNIP, GraSP, SynFlow, random, before training).
"""

from ..registry import get_method, method_names, register_method
from . import at_init, bimp, dsd, gmp, imp, lth, oneshot  # noqa: F401 - registers each method

__all__ = ["get_method", "method_names", "register_method"]
