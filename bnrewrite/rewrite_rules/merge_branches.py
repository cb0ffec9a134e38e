"""Pass: merge parallel linear branches into one conv (structural reparameterization).

Matches: the branch sets :func:`~bnrewrite.rewrite_rules.branch_sets.find_branch_sets` plans as
``merge`` - RepVGG, ACNet, Diverse Branch Block, MobileOne, RepConv, RepMixer-style blocks and
any other sum of convs, 1x1 -> kxk chains, identities, BatchNorms, average pools and per-channel
scales that read one tensor - in a captured region, either dialect.

Guarantees: each merged set becomes one ``nn.Conv`` module call on the branches' input (the
weights computed in float64, cast to the branches' dtype), every op only the branches used is
removed, and the other terms of the sum (if any) are added to it unchanged; in eval mode the
region computes the same function up to float rounding. Sets kept as they are get an FD110
diagnostic with the reason, merged ones an FD109 that names the branches.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.codes import finding
from bnrewrite.diagnostics import Action, Diagnostic
from bnrewrite.plan.decision import FoldPolicy
from bnrewrite.rewrite_rules.branch_sets import MERGE, BranchSet, find_branch_sets
from bnrewrite.semantics import branch_math as bm
from bnrewrite.semantics import ops
from bnrewrite.semantics.captured import Region
from bnrewrite.semantics.readers import metadata_readers, move_metadata_readers, value_readers
from bnrewrite.semantics.reshapes import ShapeOf

MERGE_BRANCHES = "merge-branches"
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV_TS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@dataclass
class RegionMerge:
    """What the pass found in one region, and (when applied) what it did."""

    sets: list[BranchSet] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def merging(self) -> list[BranchSet]:
        return [s for s in self.sets if s.verdict == MERGE]


def merge_region(
    region: Region, policy: FoldPolicy, *, apply: bool, shape_of: ShapeOf | None = None
) -> RegionMerge:
    """Plan (``apply=False``: nothing changes) or carry out every branch merge of ``region``."""
    result = RegionMerge(find_branch_sets(region, policy, shape_of))
    if apply and result.merging:
        _shapes_for_reads(region, result.merging)
    for bset in result.sets:
        if bset.verdict != MERGE:
            if not bset.candidate:
                continue
            result.diagnostics.append(
                finding(
                    "FD110",
                    f"{bset.owner or '<root>'}: branches not merged ({bset.branches()}): {bset.reason}",
                    bset.name,
                    bset.owner or None,
                )
            )
            continue
        target = _apply(region, bset) if apply else f"{_local(region, bset.owner)}.reparam".lstrip(".")
        where = f"{region.path}.{target}" if region.path else target
        verb = "merged into" if apply else "would merge into"
        result.diagnostics.append(
            finding(
                "FD109",
                f"{bset.owner or '<root>'}: {bset.reason}, {verb} {where}: {bset.branches()}",
                bset.name,
                bset.owner or None,
            )
        )
        result.actions.extend(merge_actions(bset, where))
    if apply and result.merging:
        for n in list(region.gm.graph.nodes):  # buffers nothing reads (an exported BN's counter)
            if n.op == "get_attr" and not n.users:
                region.gm.graph.erase_node(n)
        region.gm.graph.lint()
        region.gm.recompile()
    return result


def merge_actions(bset: BranchSet, where: str) -> list[Action]:
    """One action per BatchNorm or affine layer the merged conv absorbed (the inventory's
    verdict for it), or one for the set when it absorbed none."""
    out = []
    for t in bset.terms:
        for op in t.ops:
            if op.kind == "affine":
                site = op.data["site"]
                detail = f"merged with its parallel branches at {bset.owner or '<root>'} into {where}"
                out.append(
                    Action(MERGE_BRANCHES, site.name, site.module_path, detail, target=where, code="FD109")
                )
    if not out:
        out.append(
            Action(MERGE_BRANCHES, bset.name, bset.owner or None, bset.reason, target=where, code="FD109")
        )
    return out


def _local(region: Region, path: str) -> str:
    if region.path and path.startswith(region.path):
        return path[len(region.path) :].lstrip(".")
    return path


def _like(bset: BranchSet) -> torch.Tensor:
    for t in bset.terms:
        for op in t.ops:
            w = op.data.get("weight") if op.kind in ("conv", "conv_transpose") else None
            if isinstance(w, torch.Tensor):
                return w
    for t in bset.terms:
        for op in t.ops:
            site = op.data.get("site")
            for x in (
                getattr(site, "weight", None),
                getattr(site, "running_mean", None),
                getattr(site, "like", None),
            ):
                if isinstance(x, torch.Tensor):
                    return x
    return torch.zeros(0)


def _module(bset: BranchSet) -> nn.Module:
    assert bset.merged is not None
    m = bset.merged.map
    nd = len(m.stride)
    like = _like(bset)
    if _diagonal(m):
        return _as_batchnorm(bset, like)
    options = {
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": m.groups,
        "bias": True,
    }
    weight = m.weight
    if m.output_padding is not None:  # the merge of transposed convs
        conv = _CONV_TS[nd](
            m.in_channels, m.out_channels, m.kernel, output_padding=m.output_padding, device=like.device,
            dtype=like.dtype, **options,
        )  # fmt: skip
        weight = bm.transposed_weight(m)
    else:
        conv = _CONVS[nd](
            m.in_channels, m.out_channels, m.kernel, device=like.device, dtype=like.dtype, **options
        )
    bias = m.bias
    if bset.constant is not None:
        bias = bias + bset.constant.reshape(-1).expand(m.out_channels)
    with torch.no_grad():
        conv.weight.copy_(weight.to(like.dtype))
        conv.bias.copy_(bias.to(like.dtype))
    return conv.train(False)


def _diagonal(m: Any) -> bool:
    """A per-channel scale and shift (``x + bn(x)``): a 1x1 kernel with one weight per channel."""
    one = all(k == 1 for k in m.kernel) and all(s == 1 for s in m.stride) and not any(m.padding)
    return one and m.groups == m.in_channels == m.out_channels and m.output_padding is None


def _as_batchnorm(bset: BranchSet, like: torch.Tensor) -> nn.Module:
    """A per-channel affine map as an eval-mode BatchNorm with mean 0, variance 1 and eps 0
    (exactly ``weight * x + bias``): the fold then absorbs it into a neighbouring conv like any
    BatchNorm, or it runs as one fused op."""
    assert bset.merged is not None
    m = bset.merged.map
    bn = _BNS[len(m.stride)](m.out_channels, eps=0.0, device=like.device, dtype=like.dtype)
    bias = m.bias + (bset.constant.reshape(-1).expand(m.out_channels) if bset.constant is not None else 0.0)
    with torch.no_grad():
        bn.weight.copy_(m.weight.reshape(-1).to(like.dtype))
        bn.bias.copy_(bias.to(like.dtype))
    return bn.train(False)


def _apply(region: Region, bset: BranchSet) -> str:
    """Put the merged conv in place of the set's sum; returns its target in the region."""
    gm, graph = region.gm, region.gm.graph
    owner = _local(region, bset.owner)
    target = _free(gm, f"{owner}.reparam" if owner else "reparam")
    gm.add_submodule(target, _module(bset))
    with graph.inserting_before(bset.top):
        new = graph.call_module(target, (bset.root,))
        add = aten_add if region.dialect == "aten" else operator.add
        for t in bset.others:
            new = graph.call_function(add, (new, t.leaf))
    bset.top.replace_all_uses_with(new)
    dead = [*bset.inner, *(n for t in bset.terms for op in t.ops for n in op.nodes)]
    _move_shape_reads(dead, bset, new)
    _erase_dead(graph, dead)
    return target


aten_add = torch.ops.aten.add.Tensor
_ASSERT_META = torch.ops.aten._assert_tensor_metadata.default


def _free(gm: fx.GraphModule, target: str) -> str:
    k, name = 0, target
    while _exists(gm, name):
        k += 1
        name = f"{target}_{k}"
    return name


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return hasattr(gm, target) if "." not in target else False
    return True


def _shapes_for_reads(region: Region, sets: list[BranchSet]) -> None:
    """Record every node's shape (one run of the region) when a branch value that a merge
    removes has shape reads and no recorded shape: they move to a value of the same shape."""
    if region.shapes_known or region.inputs is None:
        return
    nodes = (n for s in sets for t in s.terms for op in t.ops for n in op.nodes)
    if any(metadata_readers(n) and ops.node_shape(n) is None for n in nodes):
        ops.propagate_shapes(region.gm, region.inputs)
        region.shapes_known = True


def _move_shape_reads(dead: list[fx.Node], bset: BranchSet, new: fx.Node) -> None:
    """Shape reads of the branches' values (``assert x.ndim == 4`` in a norm module) read a
    value of the same shape that stays: the merged output, or the input the branches read.
    Where neither has the same shape (or a shape is unknown) the read keeps its branch alive."""
    top_shape, root_shape = ops.node_shape(bset.top), ops.node_shape(bset.root)
    gone = set(dead)
    for n in dead:
        if not metadata_readers(n) or any(u not in gone for u in value_readers(n)):
            continue
        shape = ops.node_shape(n)
        if shape is None:
            continue
        if shape == top_shape:
            new.meta.setdefault("tensor_meta", bset.top.meta.get("tensor_meta"))
            move_metadata_readers(n, new)
        elif shape == root_shape:
            move_metadata_readers(n, bset.root)


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase the candidates nothing reads any more, and the stored constants only they read."""
    todo = list(dict.fromkeys(candidates))
    changed = True
    while changed:
        changed = False
        for n in list(todo):
            if getattr(n, "_erased", False) or n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr" and n.users and all(u.target is _ASSERT_META for u in n.users):
                for u in list(n.users):  # an exported dtype check of a constant nothing reads now
                    graph.erase_node(u)
            if n.users:
                continue
            inputs = n.all_input_nodes
            graph.erase_node(n)
            todo.remove(n)
            todo.extend(a for a in inputs if a.op == "get_attr" or ops.reads_only_stored(a))
            changed = True
