"""Find the branch sets of a graph and decide, for each, whether it becomes one conv.

Matches: every sum (``+``, ``-``, ``torch.add``, with scalars and stored per-channel factors
such as a layer scale, through identities) of two or more branches that read the same tensor.
A branch is the chain of single-input ops from that tensor to the sum; its ops must be linear
(:mod:`~bnrewrite.semantics.linear_ops`) and read by nothing else.

Guarantees: a set is planned as ``merge`` only when its branches compose into one conv exactly
(:mod:`~bnrewrite.semantics.branch_math`) and that conv costs no more multiply-adds and no more
stored values than the branches; every other set gets ``keep`` and the reason (a nonlinear op
between, a stride or padding mismatch, the border, the cost, ...). Nothing here changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnrewrite.plan.decision import FoldPolicy, stats_problem
from bnrewrite.select import Selector
from bnrewrite.semantics import branch_math as bm
from bnrewrite.semantics import ops
from bnrewrite.semantics.captured import Region
from bnrewrite.semantics.linear_ops import BranchOp, branch_op, combination, constant_value
from bnrewrite.semantics.ops import node_shape
from bnrewrite.semantics.readers import value_readers
from bnrewrite.semantics.reshapes import ShapeOf

MERGE, KEEP = "merge", "keep"
_DEPTH = 24  # ops walked back from a sum to find the branches' common input


@dataclass
class Term:
    """One branch: ``coef * ops(root)``."""

    coef: torch.Tensor  # float64, 0-d or one value per channel
    leaf: fx.Node
    root: fx.Node
    ops: list[BranchOp]  # from the root to the leaf
    problem: str | None = None
    nonlinear: bool = False  # an activation between the root and the sum (a residual block's body)

    def label(self, region: Region) -> str:
        if not self.ops:
            return f"identity({self.root.name})"
        names = [region.module_path(o.node) or ops.target_name(o.node) for o in self.ops]
        return " -> ".join(names)


@dataclass
class BranchSet:
    """Branches summed at ``top`` that read the same ``root``, and the verdict on them."""

    region: Region
    top: fx.Node
    root: fx.Node
    terms: list[Term]
    others: list[Term]  # terms of the same sum that stay as they are
    constant: torch.Tensor | None
    inner: list[fx.Node]  # the sum's own nodes (adds, subs, scalings, identities)
    owner: str  # the smallest module whose forward computes everything here
    verdict: str = KEEP
    reason: str = ""
    merged: bm.Merged | None = None

    @property
    def name(self) -> str:
        return self.region.qualify(self.top.name)

    @property
    def candidate(self) -> bool:
        """Two or more branches without an activation: a set meant to merge (a residual block,
        one branch through activations, is listed but draws no finding)."""
        return sum(not t.nonlinear for t in self.terms) >= 2

    def branches(self) -> str:
        return "; ".join(t.label(self.region) for t in self.terms)

    def to_dict(self) -> dict[str, Any]:
        """The set as plain data (for reports): where, which branches, the verdict and why."""
        return {
            "module": self.owner or "<root>",
            "sum": self.name,
            "input": self.root.name,
            "branches": [t.label(self.region) for t in self.terms],
            "verdict": self.verdict,
            "reason": self.reason,
        }


def find_branch_sets(region: Region, policy: FoldPolicy, shape_of: ShapeOf | None = None) -> list[BranchSet]:
    """Every branch set of ``region``, outermost sums first, each with its verdict; ``shape_of``
    gives a value's shape where no op of the set tells its channels (identities and pools)."""
    return _sets(region, policy, shape_of or node_shape)


def _sets(region: Region, policy: FoldPolicy, shape_of: ShapeOf) -> list[BranchSet]:
    gm = region.gm
    taken: set[fx.Node] = set()
    found: list[BranchSet] = []
    for node in reversed(list(gm.graph.nodes)):
        if node in taken:
            continue
        comb = combination(gm, node)
        if comb is None or comb.kind not in ("add", "sub"):
            continue
        leaves, constant, inner = _expand(gm, node)
        if len(leaves) < 2:
            continue
        terms = [_walk(region, coef, leaf, policy.eval_mode) for coef, leaf in leaves]
        for bset in _group(region, node, terms, constant, inner):
            _decide(bset, shape_of, policy.selector)
            found.append(bset)
            if bset.verdict == MERGE:
                taken.update(bset.inner)
    return found


def _expand(
    gm: fx.GraphModule, top: fx.Node
) -> tuple[list[tuple[torch.Tensor, fx.Node]], torch.Tensor | None, list[fx.Node]]:
    """The leaves of the linear expression at ``top`` with their coefficients, the constants it
    adds, and its own nodes (each read only by the expression)."""
    leaves: list[tuple[torch.Tensor, fx.Node]] = []
    constants: list[torch.Tensor] = []
    inner: list[fx.Node] = []
    one = torch.tensor(1.0, dtype=torch.float64)

    def visit(v: Any, coef: torch.Tensor, is_top: bool = False) -> None:
        if not isinstance(v, fx.Node):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                constants.append(coef * float(v))
                return
            raise LookupError
        comb = combination(gm, v) if (is_top or len(value_readers(v)) == 1) else None
        if comb is None:
            if ops.reads_only_stored(v):
                c = constant_value(gm, v)
                if isinstance(c, torch.Tensor):
                    constants.append(coef * c.double())
                    return
            leaves.append((coef, v))
            return
        inner.append(v)
        a = comb.operands
        if comb.kind == "add":
            visit(a[0], coef), visit(a[1], coef * comb.alpha)
        elif comb.kind == "sub":
            visit(a[0], coef), visit(a[1], -coef * comb.alpha)
        elif comb.kind == "neg":
            visit(a[0], -coef)
        elif comb.kind == "identity":
            visit(a[0], coef)
        else:
            c = (
                comb.constant
                if isinstance(comb.constant, torch.Tensor)
                else torch.tensor(comb.constant, dtype=torch.float64)
            )
            visit(a[0], coef * c if comb.kind == "mul" else coef / c)

    try:
        visit(top, one, True)
    except LookupError:
        return [], None, []
    constant = None
    for c in constants:
        constant = c if constant is None else constant + c
    return leaves, constant, inner


def _walk(region: Region, coef: torch.Tensor, leaf: fx.Node, eval_mode: bool) -> Term:
    """The branch ending at ``leaf``: walk back through single-input ops to the first value
    something else also reads (or that no op computes). Past the first op that is not linear
    the walk only looks for that value (to say what lies between it and the sum)."""
    chain: list[BranchOp] = []
    problem = None
    cur: fx.Node = leaf
    owned: set[fx.Node] = set()  # the nodes of the ops walked so far, which may read ``cur``
    for _ in range(_DEPTH):
        op = branch_op(region, cur, eval_mode) if problem is None else _any_op(cur)
        values_read = value_readers(cur)  # (a shape assert on it is no reader)
        readers = set(values_read) - owned - (set(op.nodes) if op is not None else set())
        if op is None or (readers if chain else len(values_read) > 1):
            break
        why = op.problem or ("a nonlinear op" if op.kind == "nonlinear" else None)
        if why and problem is None:
            where = region.module_path(op.node) or op.node.name
            problem = f"{why} ({where}) between {op.input.name} and the sum"
            if op.kind == "nonlinear":
                problem = f"a nonlinear op, {op.problem}, between {op.input.name} and the sum"
        chain.insert(0, op)
        owned = set(op.nodes)
        cur = op.input
    return Term(coef, leaf, cur, chain, problem, any(o.kind == "nonlinear" for o in chain))


def _any_op(node: fx.Node) -> BranchOp | None:
    """Any op with one activation input (stored tensors aside), as a step of the walk."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr" and not ops.reads_only_stored(a)]
    return BranchOp("other", node, inputs[0], nodes=[node]) if len(inputs) == 1 else None


def _group(
    region: Region, top: fx.Node, terms: list[Term], constant: Any, inner: list[fx.Node]
) -> list[BranchSet]:
    by_root: dict[fx.Node, list[Term]] = {}
    for t in terms:
        by_root.setdefault(t.root, []).append(t)
    sets = []
    first = True
    for root, group in by_root.items():
        if len(group) < 2:
            continue
        others = [t for t in terms if t.root is not root]
        owner = _owner(region, top, group, inner)
        sets.append(BranchSet(region, top, root, group, others, constant if first else None, inner, owner))
        first = False
    return sets


def _owner(region: Region, top: fx.Node, terms: list[Term], inner: list[fx.Node]) -> str:
    paths = [_caller(region, n) for n in [top, *inner, *(o.node for t in terms for o in t.ops)]]
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _caller(region: Region, node: fx.Node) -> str:
    """The path of the module whose forward runs ``node``."""
    path = region.module_path(node) or ""
    if node.op == "call_module":
        path = path.rpartition(".")[0]
    return path


def _decide(bset: BranchSet, shape_of: ShapeOf, selector: Selector | None = None) -> None:
    """MERGE when two or more branches are one conv together at no more cost; a branch that is
    not linear (or not exact at the border) stays a term of the sum beside the merged conv. With
    a selection (``select``/``types``), only sets whose every BatchNorm is selected merge."""
    maps: dict[int, bm.ConvMap] = {}
    candidates = [t for t in bset.terms if t.problem is None]
    outside = _outside(bset, candidates, selector) if selector is not None else None
    if outside is not None:
        bset.reason = f"{outside} is outside the selection ({selector.describe() if selector else ''})"
        return
    geometry: tuple[int, int] | None = None  # the input's (channels, spatial dims), looked up once
    for i, t in enumerate(bset.terms):
        if t.problem is None and len(candidates) >= 2:
            try:
                geometry = geometry or _input_geometry(bset, shape_of)
                maps[i] = _term_map(bset, t, geometry)
            except bm.Refused as e:
                t.problem = str(e)
    linear = [t for t in bset.terms if t.problem is None]
    refused = [t for t in bset.terms if t.problem is not None]
    if len(linear) < 2:
        bset.reason = (refused[0].problem or "") if refused else "fewer than two linear branches"
        return
    kept = bset.others + refused
    if kept and any(float(t.coef.abs().max()) != 1.0 or bool((t.coef < 0).any()) for t in kept):
        bset.reason = f"the sum also scales branches that do not merge ({refused[0].problem if refused else 'other inputs'})"
        return
    try:
        merged = bm.merge(list(maps.values()), adds=len(linear) - 1)
    except bm.Refused as e:
        bset.reason = str(e)
        return
    m = merged.map
    if m.macs() > merged.branch_macs or m.params > merged.branch_params:
        bset.reason = (
            f"the merged conv would cost more ({m.macs():.0f} vs {merged.branch_macs:.0f} multiply-adds per "
            f"position, {m.params} vs {merged.branch_params} stored values)"
        )
        return
    diagonal = all(k == 1 for k in m.kernel) and m.groups == m.in_channels == m.out_channels and not m.spatial
    diagonal = diagonal and m.output_padding is None
    if not diagonal and not _has_branch_shape(m, linear):
        bset.reason = (
            f"the merged conv ({'x'.join(map(str, m.kernel))}, groups {m.groups}) has the shape of no branch's "
            "conv: fewer multiply-adds, but its speed here is not known"
        )
        return
    bset.terms, bset.others, bset.verdict, bset.merged = linear, bset.others + refused, MERGE, merged
    kind = "transposed conv" if m.output_padding is not None else "conv"
    what = "a per-channel scale and shift" if diagonal else f"one {'x'.join(map(str, m.kernel))} {kind}"
    bset.reason = f"{len(linear)} branches become {what}"
    if refused:
        bset.reason += "; kept beside it: " + "; ".join(t.problem or "" for t in refused)


def _outside(bset: BranchSet, terms: list[Term], selector: Selector) -> str | None:
    """The first BatchNorm of the set the selection leaves out (the block, for a set of plain
    convs), or None when the merge is wanted."""
    sites = [op.data["site"] for t in terms for op in t.ops if op.kind == "affine"]
    for site in sites:
        if not selector.matches(site.module_path, site.kind):
            return site.module_path or site.name
    if not sites and not selector.matches(bset.owner, ""):
        return bset.owner or "<root>"
    return None


def _has_branch_shape(m: bm.ConvMap, terms: list[Term]) -> bool:
    """True when one branch already runs a conv of the merged conv's shape (so the merged one
    runs what that branch ran, with other weights): a merge never makes a layer slower."""
    for t in terms:
        for op in t.ops:
            if op.kind not in ("conv", "conv_transpose") or op.data.get("output_padding") != m.output_padding:
                continue
            d = op.data
            same = (
                tuple(d["weight"].shape[2:]) == m.kernel
                and d["groups"] == m.groups
                and d["stride"] == m.stride
            )
            if same and d["dilation"] == m.dilation and d["padding"] == m.padding:
                return True
    return False


def _term_map(bset: BranchSet, term: Term, geometry: tuple[int, int]) -> bm.ConvMap:
    m = bm.identity(*geometry)
    for op in term.ops:
        m = _then(m, op, bset.region)
    return bm.then_affine(m, term.coef, None, params=int(term.coef.numel()) if term.coef.dim() else 0)


def _then(m: bm.ConvMap, op: BranchOp, region: Region) -> bm.ConvMap:
    what = region.module_path(op.node) if op.node.op == "call_module" else op.node.name
    d = op.data
    if op.kind == "affine":
        site = d["site"]
        problem = stats_problem(site)
        if problem:
            raise bm.Refused(f"{what}: {problem}")
        scale, shift = site.eval_affine()
        stored = [t for t in (site.weight, site.bias, site.running_mean, site.running_var) if t is not None]
        params = sum(int(t.numel()) for t in stored) or 2 * int(scale.numel())
        return bm.then_affine(m, scale, shift, params)
    if op.kind == "conv":
        return bm.then_conv(
            m, d["weight"], d["bias"], d["stride"], d["padding"], d["dilation"], d["groups"], what or "conv"
        )
    if op.kind == "conv_transpose":
        args = (
            d["weight"],
            d["bias"],
            d["stride"],
            d["padding"],
            d["dilation"],
            d["groups"],
            d["output_padding"],
        )
        return bm.then_conv_transpose(m, *args, what or "conv_transpose")
    if op.kind == "pool":
        return bm.then_pool(m, d["kernel"], d["stride"], d["padding"], d["divisor"], what or "pool")
    if op.kind == "pad":
        return bm.then_pad(m, d["pads"], d["value"], what or "pad")
    return m  # identity


def _input_geometry(bset: BranchSet, shape_of: ShapeOf) -> tuple[int, int]:
    """(channels, spatial dims) of the tensor the branches read."""
    channels = nd = None
    for t in bset.terms:
        for op in t.ops[:1]:
            if op.kind == "conv":
                w = op.data["weight"]
                channels, nd = int(w.shape[1]) * op.data["groups"], w.dim() - 2
            elif op.kind == "conv_transpose":
                w = op.data["weight"]
                channels, nd = int(w.shape[0]), w.dim() - 2
            elif op.kind == "affine" and channels is None:
                site = op.data["site"]
                channels = int(site.eval_affine()[0].numel())
                digits = [c for c in str(site.kind)[-2:] if c.isdigit()]
                nd = nd if nd is not None or not digits else int(digits[0])
        for op in t.ops:
            if nd is None and op.kind in ("conv", "conv_transpose", "pool"):
                nd = len(op.data["stride"])
    shape = node_shape(bset.root) if channels is not None and nd is not None else shape_of(bset.root)
    if shape is not None and len(shape) >= 2:
        channels = channels or int(shape[1])
        nd = nd if nd is not None else len(shape) - 2
    if channels is None or nd is None:
        raise bm.Refused("the branches' input shape is unknown: pass example inputs")
    return channels, nd
