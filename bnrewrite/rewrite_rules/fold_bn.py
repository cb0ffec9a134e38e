"""The BatchNorm rules over one region, to a fixed point: it owns the region's graph and the
folded layers' weight slots; each fold is carried out by the rule that decided it
(``bn_rules.RULES``: into_preceding, into_concat, into_sum, into_following).

Matches: every BatchNorm application in a captured region - ``nn.BatchNorm*``/``SyncBatchNorm``
modules, frozen-BN modules, ``F.batch_norm`` and ATen ``batch_norm`` - whose statistics and
affine parameters are stored tensors.

Guarantees: in eval mode the rewritten region computes the same function (up to rounding of
float64-computed weights cast back to the layer dtype), and never with more ops. BatchNorms are
folded into the preceding layer (or every layer of a channel concatenation or a sum before it,
or a Linear through reshapes), else into every following layer, repeated to a fixed point; what
is left stays a BatchNorm (one fused op in eval mode) with a diagnostic, or becomes a
:class:`~bnrewrite.modules.ChannelAffine` when ``bn_to_affine`` asks for it.
Layers shared between call sites get a folded copy per site, so other sites are unaffected.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.capture.tracer import compile_now
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Action, Diagnostic
from bnrewrite.editor.edit import Editor, shallow_copy
from bnrewrite.editor.slots import Compute, Slot
from bnrewrite.modules import ChannelAffine
from bnrewrite.plan.decision import (
    FOLLOWING,
    NOT_FOLDABLE,
    PRECEDING,
    SCALE_SHIFT,
    Decision,
    FoldPolicy,
    RankOf,
)
from bnrewrite.rewrite_rules.bn_rules import RULES, decide
from bnrewrite.semantics import fold_math, ops
from bnrewrite.semantics.affine import Absorbed, Affine
from bnrewrite.semantics.captured import Region
from bnrewrite.semantics.layers import LayerSite
from bnrewrite.semantics.norms import BNSite, bn_site, fetch_attr
from bnrewrite.semantics.ops import EQUIV, source_line

RULE = "fold-bn"


@dataclass
class Applied:
    """One rewrite the pass applied to the region's graph, with what a module-tree edit needs:
    the BatchNorm's call, each changed layer (node and where its final tensors live), and for a
    scale-and-shift the module that replaced the BatchNorm."""

    decision: Decision
    action: Action
    bn_call: fx.Node  # erased from the graph for a fold; kept for its meta and arguments
    layers: list[tuple[fx.Node, Slot, str | None]] = field(default_factory=list)  # node, slot, copied from
    affine: nn.Module | None = None
    bn_attrs: list[str] = field(default_factory=list)  # stored tensors the BatchNorm read (get_attr)
    absorbed: list[Absorbed] = field(
        default_factory=list
    )  # what each changed layer absorbed (the proof's check)
    bn_affine: Affine | None = None  # the BatchNorm's eval scale, shift


def _preceding(kind: str, groups: int, s: Any, t: Any, w: torch.Tensor, b: torch.Tensor | None) -> Any:
    return fold_math.into_preceding(kind, w, b, groups, s, t)


def _following(kind: str, groups: int, s: Any, t: Any, w: torch.Tensor, b: torch.Tensor | None) -> Any:
    return fold_math.into_following(kind, w, b, groups, s, t)


class _RegionFolder:
    def __init__(
        self,
        region: Region,
        rank_of: RankOf,
        policy: FoldPolicy,
        *,
        inplace: bool,
        compile: bool = True,
        detached: bool = False,
    ) -> None:
        self.region = region
        self.policy = policy
        self.compile = compile
        self.detached = detached
        self._slots: dict[str, Slot] = {}
        self.graph = region.gm.graph
        self.rank_of = rank_of
        self.inplace = inplace
        self.editor = Editor(region.gm, inplace=inplace)
        self.calls = Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")
        self.attrs = Counter(str(n.target) for n in self.graph.nodes if n.op == "get_attr")
        self.actions: list[Action] = []
        self.diagnostics: list[Diagnostic] = []
        self.pending: list[tuple[Slot, Compute]] = []
        self.applied: list[Applied] = []
        self.kept: list[Decision] = []  # the final decision for every BatchNorm that stays

    # -- driving -----------------------------------------------------------------------------
    def run(self) -> None:
        # Folds only remove BatchNorms, so the candidates are found once, in graph order.
        candidates = [n for n in self.graph.nodes if self._site(n) is not None]
        changed = True
        while changed:
            changed = False
            for node in candidates:
                site = self._site(node)
                if site is None:
                    continue
                decision = self._decide(site)
                if decision.verdict in (PRECEDING, FOLLOWING):
                    self._apply_fold(decision)
                    changed = True
        for node in candidates:
            site = self._site(node)
            if site is None:
                continue
            decision = self._decide(site)
            if decision.verdict == SCALE_SHIFT:
                self._apply_scale_shift(decision)
            if decision.verdict in (SCALE_SHIFT, NOT_FOLDABLE):
                self._diagnose(decision)
                self.kept.append(decision)
        self.graph.lint()
        # Generate and compile the final code first, then allocate the folded weights, so the
        # transient memory of code generation never stacks on top of the new tensors. A region
        # that only plans module-tree edits is never compiled.
        if self.compile:
            compile_now(self.region.gm)
            self.fill()

    def fill(self) -> None:
        """Compute and store the folded weights (after the graph work, so peaks do not stack)."""
        for slot, compute in self.pending:
            slot.fill(compute)
        self.pending.clear()

    def _decide(self, site: BNSite) -> Decision:
        return decide(site, self.rank_of, self.policy)

    def _site(self, node: fx.Node) -> BNSite | None:
        if getattr(node, "_erased", False) or node.op not in ("call_module", "call_function"):
            return None
        site = bn_site(self.region, node)
        selector = self.policy.selector
        if site is not None and selector is not None and not selector.matches(site.module_path, site.kind):
            return None
        return site

    # -- rewrites ----------------------------------------------------------------------------
    def _apply_fold(self, d: Decision) -> None:
        site = d.site
        scale, shift = site.eval_affine()
        assert site.input is not None and site.call is not None
        layers, absorbed, targets = RULES[d.rule].rewrite(self, d, scale, shift)
        bn_call = site.call
        bn_attrs = [str(n.target) for n in bn_call.all_input_nodes if n.op == "get_attr"]
        self._erase_bn(site)
        target = ", ".join(t.region.module_path(t.node) or t.name for t in targets)
        action = Action(d.verdict, site.name, site.module_path, d.reason, target=target, code=d.code)
        self.actions.append(action)
        applied = Applied(
            d,
            action,
            bn_call,
            layers,
            bn_attrs=bn_attrs,
            absorbed=absorbed,
            bn_affine=Affine(scale, shift, d.site.axis),
        )
        self.applied.append(applied)

    def absorb(self, layer: LayerSite, d: Decision, absorbed: Absorbed) -> tuple[fx.Node, Slot, str | None]:
        """Give ``layer`` weights that absorb one map (computed after the graph work)."""
        assert layer.weight is not None
        fold = _following if absorbed.before else _preceding
        compute = functools.partial(
            fold, layer.kind, layer.groups, absorbed.affine.scale, absorbed.affine.shift
        )
        entry = self._write_layer(layer, compute)
        self._tag(layer.node, d)
        return entry

    def bypass(self, d: Decision) -> None:
        """The BatchNorm's readers read its input (the layer, or the cat/sum/reshape over it)."""
        site = d.site
        equiv = site.node.meta.get(EQUIV, site.node.name)
        site.node.replace_all_uses_with(site.input)
        site.input.meta[EQUIV] = equiv

    def _apply_scale_shift(self, d: Decision) -> None:
        site = d.site
        assert site.call is not None
        bn_call = site.call
        bn_attrs = [str(n.target) for n in bn_call.all_input_nodes if n.op == "get_attr"]
        scale, shift = site.eval_affine()
        ref = site.weight if site.weight is not None else site.running_mean
        ref = ref if ref is not None else site.like
        assert ref is not None
        module = ChannelAffine(
            scale.to(dtype=ref.dtype, device=ref.device), shift.to(dtype=ref.dtype, device=ref.device)
        )
        equiv = site.node.meta.get(EQUIV, site.node.name)
        if site.module is not None:
            if not self.detached:
                self.editor.set_module(str(site.call.target), module)
            new = site.call
        else:
            name = self.editor.free_name(f"{site.node.name}_affine")
            self.region.gm.add_module(name, module)
            with self.graph.inserting_after(site.node):
                new = self.graph.call_module(name, (site.input,))
            site.node.replace_all_uses_with(new)
            self._erase_bn(site)
        new.meta[EQUIV] = equiv
        self._tag(new, d)
        action = Action(SCALE_SHIFT, site.name, site.module_path, d.reason, code=d.code)
        self.actions.append(action)
        self.applied.append(Applied(d, action, bn_call, affine=module, bn_attrs=bn_attrs))

    def _diagnose(self, d: Decision) -> None:
        site = d.site
        kept = d.verdict == NOT_FOLDABLE and bool(d.notes)  # usable, but no neighbour absorbs it
        what = "not folded, stays a BatchNorm (one fused op)" if kept else "not folded"
        if site.is_affine_layer:
            what = f"not folded, stays as it is ({site.kind}, one op)"
        for code, message in d.notes or [(d.code, d.reason)]:
            self.diagnostics.append(
                finding(
                    code,
                    f"{site.module_path or site.name}: {what}: {message}",
                    site.name,
                    site.module_path,
                    source_line(site.call),
                )
            )

    def _tag(self, node: fx.Node, d: Decision) -> None:
        node.meta["bnrewrite"] = {"rule": d.verdict, "bn": d.site.name}

    def _erase_bn(self, site: BNSite) -> None:
        call = site.call
        inputs = [n for n in call.all_input_nodes if n.op == "get_attr"]
        if site.node is not call:
            self.graph.erase_node(site.node)
        self.graph.erase_node(call)
        for n in reversed(site.extra):  # the rest of a BatchNorm computed op by op
            if not n.users and not getattr(n, "_erased", False):
                inputs.extend(a for a in n.all_input_nodes if a.op == "get_attr")
                self.graph.erase_node(n)
        for n in inputs:
            if not n.users:
                self.attrs[str(n.target)] -= 1
                self.graph.erase_node(n)

    # -- writing weights ---------------------------------------------------------------------
    def _write_layer(self, layer: LayerSite, compute: Compute) -> tuple[fx.Node, Slot, str | None]:
        """Point the layer at weights it owns now; fill them with ``compute`` after compiling.

        Returns the node, where its tensors live, and the shared module/attribute it was copied
        from when this call site got its own copy."""
        copied: str | None = None
        if layer.module is not None:
            target = str(layer.node.target)
            if self.calls[target] > 1:  # shared module: this call site gets its own copy
                module = shallow_copy(layer.module)
                new_target = self._free_sibling(target)
                self.editor.set_module(new_target, module)
                self.calls[target] -= 1
                self.calls[new_target] = 1
                layer.node.target = new_target
                slot = Slot(module, None, None, in_place=False)
                copied = target
            elif self.detached:  # tree mode: the new tensors wait in the slot, modules untouched
                slot = self._slots.get(target) or Slot(layer.module, None, None, in_place=self.inplace)
                slot.detached = True
                self._slots[target] = slot
            else:
                slot = Slot(self.editor.own(target), None, None, in_place=self.inplace)
        else:
            weight, fresh_w = self._attr_for(layer, "weight")
            bias, fresh_b = self._attr_for(layer, "bias")
            # a fresh attribute starts as the shared tensor: never write into that one
            in_place = self.inplace and not (fresh_w or fresh_b)
            slot = Slot(self.region.gm, weight, bias, in_place=in_place, editor=self.editor)
            copied = weight if fresh_w else None
        self.pending.append((slot, compute))
        return layer.node, slot, copied

    def _attr_for(self, layer: LayerSite, name: str) -> tuple[str, bool]:
        """The attribute a functional layer's ``name`` argument will read, and whether it is new."""
        node = layer.node
        arg: Any = ops.bind(node, layer.arg_names).get(name)
        is_attr = isinstance(arg, fx.Node) and arg.op == "get_attr"
        if is_attr and len(arg.users) == 1 and self.attrs[str(arg.target)] == 1:
            return str(arg.target), False  # only this call reads it: rewrite it where it is
        attr = self.editor.free_name(f"{node.name}_{name}")
        current = fetch_attr(self.region.gm, str(arg.target)) if is_attr else None
        if current is None:  # no bias yet: a placeholder of the right size, filled later
            assert layer.weight is not None
            n = (
                layer.weight.shape[1] * layer.groups
                if layer.kind == "conv_transpose"
                else layer.weight.shape[0]
            )
            current = torch.zeros(n, dtype=layer.weight.dtype, device=layer.weight.device)
        self.region.gm.register_parameter(
            attr, nn.Parameter(current.detach(), requires_grad=current.is_floating_point())
        )
        self.attrs[attr] = 1
        with self.graph.inserting_before(node):
            new = self.graph.get_attr(attr)
        ops.set_arg(node, layer.arg_names, name, new)
        if is_attr and not arg.users:
            self.attrs[str(arg.target)] -= 1
            self.graph.erase_node(arg)
        return attr, True

    def _free_sibling(self, target: str) -> str:
        parent, _, name = target.rpartition(".")
        owner = self.region.gm.get_submodule(parent) if parent else self.region.gm
        k = 1
        while hasattr(owner, f"{name}_folded{k}"):
            k += 1
        return f"{parent + '.' if parent else ''}{name}_folded{k}"


@dataclass
class RegionFold:
    """What folding one region did: report entries and the applied rewrites."""

    actions: list[Action]
    diagnostics: list[Diagnostic]
    applied: list[Applied]
    pending: list[tuple[Slot, Compute]]  # weights still to compute (``compile=False`` only)
    kept: list[Decision] = field(default_factory=list)  # why each BatchNorm left stays


def fold_region(
    region: Region,
    rank_of: RankOf,
    policy: FoldPolicy,
    *,
    inplace: bool = False,
    compile: bool = True,
) -> RegionFold:
    """Fold every (selected) BatchNorm of one region in place (the region's graph module is ours).

    ``compile=False`` when the graph only plans module-tree edits and is never run: then module
    layers are not written either, and the weights are left to compute (``pending``, each with
    ``slot.fill(compute)``): the caller does it once the graphs are released, and the new
    tensors wait in the slots for the tree edits."""
    folder = _RegionFolder(region, rank_of, policy, inplace=inplace, compile=compile, detached=not compile)
    folder.run()
    return RegionFold(folder.actions, folder.diagnostics, folder.applied, folder.pending, folder.kept)
