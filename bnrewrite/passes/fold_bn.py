"""Pass: fold eval-mode BatchNorm into neighbouring conv/linear weights.

Matches: every BatchNorm application in a captured region - ``nn.BatchNorm*``/``SyncBatchNorm``
modules, frozen-BN modules, ``F.batch_norm`` and ATen ``batch_norm`` - whose statistics and
affine parameters are stored tensors.

Guarantees: in eval mode the rewritten region computes the same function (up to rounding of
float64-computed weights cast back to the layer dtype). BatchNorms are folded into the preceding
layer, else into every following layer, repeated to a fixed point; what is left but usable
becomes a :class:`~bnrewrite.nn.ChannelAffine`; everything else stays and gets a diagnostic.
Layers shared between call sites get a folded copy per site, so other sites are unaffected.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from .. import codes
from ..diagnostics import Action, Diagnostic
from ..graph import ops
from ..graph.capture import Region, source_line
from ..graph.edit import Editor, shallow_copy
from ..graph.norms import BNSite, LayerSite, bn_site
from ..nn import ChannelAffine
from ..select import Selector
from . import fold_math
from .fold_plan import FOLLOWING, NOT_FOLDABLE, PRECEDING, SCALE_SHIFT, Decision, RankOf, decide

RULE = "fold-bn"
EQUIV = "bnrewrite_equiv"  # node.meta key: name of the original node whose value this node now has


class _RegionFolder:
    def __init__(
        self,
        region: Region,
        rank_of: RankOf,
        *,
        eval_mode: bool,
        inplace: bool,
        selector: Selector | None = None,
    ) -> None:
        self.region = region
        self.selector = selector
        self.graph = region.gm.graph
        self.rank_of = rank_of
        self.eval_mode = eval_mode
        self.inplace = inplace
        self.editor = Editor(region.gm, inplace=inplace)
        self.calls = Counter(str(n.target) for n in self.graph.nodes if n.op == "call_module")
        self.attrs = Counter(str(n.target) for n in self.graph.nodes if n.op == "get_attr")
        self.actions: list[Action] = []
        self.diagnostics: list[Diagnostic] = []

    # -- driving -----------------------------------------------------------------------------
    def run(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in list(self.graph.nodes):
                site = self._site(node)
                if site is None:
                    continue
                decision = decide(site, self.rank_of, eval_mode=self.eval_mode)
                if decision.verdict in (PRECEDING, FOLLOWING):
                    self._apply_fold(decision)
                    changed = True
        for node in list(self.graph.nodes):
            site = self._site(node)
            if site is None:
                continue
            decision = decide(site, self.rank_of, eval_mode=self.eval_mode)
            if decision.verdict == SCALE_SHIFT:
                self._apply_scale_shift(decision)
            if decision.verdict in (SCALE_SHIFT, NOT_FOLDABLE):
                self._diagnose(decision)
        self.graph.lint()
        self.region.gm.recompile()

    def _site(self, node: fx.Node) -> BNSite | None:
        if getattr(node, "_erased", False) or node.op not in ("call_module", "call_function"):
            return None
        site = bn_site(self.region, node)
        if (
            site is not None
            and self.selector is not None
            and not self.selector.matches(site.module_path, site.kind)
        ):
            return None
        return site

    # -- rewrites ----------------------------------------------------------------------------
    def _apply_fold(self, d: Decision) -> None:
        site = d.site
        scale, shift = site.eval_affine()
        equiv = site.node.meta.get(EQUIV, site.node.name)
        if d.verdict == PRECEDING:
            layer = d.producer
            assert layer is not None and layer.weight is not None
            w, b = fold_math.into_preceding(layer.kind, layer.weight, layer.bias, layer.groups, scale, shift)
            self._write_layer(layer, w, b)
            site.node.replace_all_uses_with(layer.node)
            layer.node.meta[EQUIV] = equiv
            self._tag(layer.node, d)
            targets = [layer]
        else:
            assert site.input is not None
            for layer, entry in zip(d.consumers, d.entries):
                assert layer.weight is not None
                w, b = fold_math.into_following(
                    layer.kind, layer.weight, layer.bias, layer.groups, scale, shift
                )
                self._write_layer(layer, w, b)
                entry.args = (site.input, *entry.args[1:])
                self._tag(layer.node, d)
            targets = d.consumers
        self._erase_bn(site)
        self.actions.append(
            Action(
                d.verdict,
                site.name,
                site.module_path,
                d.reason,
                target=", ".join(t.region.module_path(t.node) or t.name for t in targets),
                code=d.code,
            )
        )

    def _apply_scale_shift(self, d: Decision) -> None:
        site = d.site
        scale, shift = site.eval_affine()
        ref = site.weight if site.weight is not None else site.running_mean
        assert ref is not None
        module = ChannelAffine(
            scale.to(dtype=ref.dtype, device=ref.device), shift.to(dtype=ref.dtype, device=ref.device)
        )
        equiv = site.node.meta.get(EQUIV, site.node.name)
        if site.module is not None:
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
        self.actions.append(Action(SCALE_SHIFT, site.name, site.module_path, d.reason, code=d.code))

    def _diagnose(self, d: Decision) -> None:
        site = d.site
        for code, message in d.notes or [(d.code, d.reason)]:
            self.diagnostics.append(
                Diagnostic(
                    code,
                    codes.get(code).severity,
                    f"{site.module_path or site.name}: not folded: {message}",
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
        for n in inputs:
            if not n.users:
                self.attrs[str(n.target)] -= 1
                self.graph.erase_node(n)

    # -- writing weights ---------------------------------------------------------------------
    def _write_layer(self, layer: LayerSite, w64: torch.Tensor, b64: torch.Tensor) -> None:
        assert layer.weight is not None
        ref = layer.weight
        w = w64.to(dtype=ref.dtype, device=ref.device)
        b = b64.to(dtype=(layer.bias if layer.bias is not None else ref).dtype, device=ref.device)
        if layer.module is not None:
            target = str(layer.node.target)
            if self.calls[target] > 1:
                module = shallow_copy(layer.module)
                new_target = self._free_sibling(target)
                self.editor.set_module(new_target, module)
                self.calls[target] -= 1
                self.calls[new_target] = 1
                layer.node.target = new_target
                self._assign(module, "weight", w, copy=False)
                self._assign(module, "bias", b, copy=False)
            else:
                module = self.editor.own(target)
                self._assign(module, "weight", w, copy=self.inplace)
                self._assign(module, "bias", b, copy=self.inplace)
            return
        self._write_arg(layer, "weight", w)
        self._write_arg(layer, "bias", b)

    def _assign(self, module: nn.Module, name: str, value: torch.Tensor, *, copy: bool) -> None:
        old = module._parameters.get(name)
        if copy and old is not None and old.shape == value.shape and old.dtype == value.dtype:
            with torch.no_grad():
                old.copy_(value)
            return
        weight = module._parameters.get("weight")
        requires_grad = (
            (old if old is not None else weight).requires_grad
            if (old is not None or weight is not None)
            else True
        )
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)

    def _write_arg(self, layer: LayerSite, name: str, value: torch.Tensor) -> None:
        node = layer.node
        arg: Any = ops.bind(node, layer.arg_names).get(name)
        is_attr = isinstance(arg, fx.Node) and arg.op == "get_attr"
        if is_attr and len(arg.users) == 1 and self.attrs[str(arg.target)] == 1:
            old = self.editor.own(str(arg.target).rpartition(".")[0])
            old_t = getattr(old, str(arg.target).rpartition(".")[2])
            if self.inplace and old_t.shape == value.shape and old_t.dtype == value.dtype:
                with torch.no_grad():
                    old_t.copy_(value)
            else:
                self.editor.set_tensor(str(arg.target), value)
            return
        attr = self.editor.free_name(f"{node.name}_{name}")
        self.region.gm.register_parameter(attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
        self.attrs[attr] = 1
        with self.graph.inserting_before(node):
            new = self.graph.get_attr(attr)
        ops.set_arg(node, layer.arg_names, name, new)
        if is_attr and not arg.users:
            self.attrs[str(arg.target)] -= 1
            self.graph.erase_node(arg)

    def _free_sibling(self, target: str) -> str:
        parent, _, name = target.rpartition(".")
        owner = self.region.gm.get_submodule(parent) if parent else self.region.gm
        k = 1
        while hasattr(owner, f"{name}_folded{k}"):
            k += 1
        return f"{parent + '.' if parent else ''}{name}_folded{k}"


def fold_region(
    region: Region,
    rank_of: RankOf,
    *,
    eval_mode: bool = False,
    inplace: bool = False,
    selector: Selector | None = None,
) -> tuple[list[Action], list[Diagnostic]]:
    """Fold every (selected) BatchNorm of one region in place (the region's graph module is ours)."""
    folder = _RegionFolder(region, rank_of, eval_mode=eval_mode, inplace=inplace, selector=selector)
    folder.run()
    return folder.actions, folder.diagnostics
