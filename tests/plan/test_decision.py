"""The statistics check is answered once per tensor version, and never from a stale answer."""

from __future__ import annotations

import torch
from torch import nn

from bnrewrite.plan.decision import stats_problem
from bnrewrite.semantics.norms import module_bn_site


def test_an_in_place_change_is_seen_after_a_cached_answer():
    bn = nn.BatchNorm2d(4).eval()
    site = module_bn_site(bn)
    assert site is not None and stats_problem(site) is None
    assert stats_problem(site) is None  # answered from the cache
    with torch.no_grad():
        bn.running_var[1] = float("nan")  # bumps the tensor's version
    assert stats_problem(module_bn_site(bn)) == "running_var has NaN/Inf values"
    with torch.no_grad():
        bn.running_var.fill_(1.0)
        bn.weight[0] = float("inf")
    assert stats_problem(module_bn_site(bn)) == "weight has NaN/Inf values"


def test_a_replaced_tensor_is_not_answered_for_by_its_predecessor():
    bn = nn.BatchNorm2d(4).eval()
    assert stats_problem(module_bn_site(bn)) is None
    bn.running_mean = torch.full((4,), float("nan"))  # a new tensor, same key tensor (running_var)
    assert stats_problem(module_bn_site(bn)) == "running_mean has NaN/Inf values"
