"""The pieces that register themselves are the ones the schema offers."""

from __future__ import annotations

import typing

from compresspipe.compress.pruning.config import Method
from compresspipe.compress.pruning.methods import method_names
from compresspipe.stages.registry import list_stages


def test_every_prune_method_in_the_schema_is_registered_and_back():
    assert sorted(typing.get_args(Method)) == sorted(method_names())


def test_built_in_stages_declare_their_traits():
    stages = list_stages()
    assert {n for n, c in stages.items() if c.logs_weight_histograms} == {"cluster", "qat", "ptq"}
    assert {n for n, c in stages.items() if c.deploys_int8} == {"qat", "ptq"}
    assert {n for n, c in stages.items() if c.codes_incoming_deployable} == {"huffman"}
