"""What every surgery shares: the rewriter that lands module replacements in a copy of the
user's tree and graph edits in the smallest enclosing module, the measured deviation, and the
norm modules that do more than normalize (replaced by the new norm followed by their rest)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.capture.capture_model import capture, capture_submodule
from bnrewrite.capture.tracer import compile_now
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Report
from bnrewrite.driver import describe_module
from bnrewrite.editor.bind import bind
from bnrewrite.editor.edit import Editor, shallow_copy
from bnrewrite.editor.units import ModuleEdit, Unit, common_prefix, covers
from bnrewrite.errors import VerificationError
from bnrewrite.fold import RewriteResult
from bnrewrite.plan.steps import GraphStep, Plan, SwapStep
from bnrewrite.rewrite_rules.bn_tree import node_scope
from bnrewrite.rewrite_rules.norm_rest import Rest, ops_by_module, rest_of
from bnrewrite.runtime import buffers_restored, own_copies
from bnrewrite.select import Selector
from bnrewrite.semantics.captured import Capture, Region
from bnrewrite.semantics.norms import (
    BNSite,
    OtherNormSite,
    bn_site,
    find_norms,
    norm_with_stats,
    opaque_norms,
    other_norm_site,
)
from bnrewrite.semantics.ops import stack_path
from bnrewrite.verify import verify

Redo = Callable[[nn.Module, "tuple[Any, ...] | None", str], nn.Module]
_GRAPH_WHY = "a functional norm or an inserted layer is a graph edit that the module tree cannot express"


class Rewriter:
    """Collects module replacements and graph edits, then builds the rewritten model.

    Module replacements land in a copy of the user's module tree. Graph edits are carried by
    the smallest module that encloses every edited node: when that is deeper than the captured
    region, ``redo`` runs the same surgery on that module alone (its own graph, recorded inputs)
    and only it is replaced; every replacement by a graph is reported (FD104)."""

    def __init__(self, cap: Capture, report: Report, redo: Redo | None = None) -> None:
        self.cap = cap
        self.report = report
        self.redo = redo
        self.modules: dict[str, nn.Module] = {}
        self.edited: dict[str, Editor] = {}
        self.scopes: dict[str, set[str]] = {}
        self._lookup: dict[str, nn.Module] | None = None

    def replace_module(self, path: str, new: nn.Module) -> None:
        self.modules[path] = new

    def editor(self, region: Region, node: fx.Node | None = None) -> Editor:
        if region.path not in self.edited:
            self.edited[region.path] = Editor(region.gm)
        scope = region.path if node is None else node_scope(self._module_at, region, node)
        self.scopes.setdefault(region.path, set()).add(scope)
        return self.edited[region.path]

    def _module_at(self, path: str) -> nn.Module | None:
        if self._lookup is None:
            model = self.cap.model
            self._lookup = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        return self._lookup.get(path)

    def build(self) -> nn.Module:
        cap = self.cap
        if isinstance(cap.model, (torch.export.ExportedProgram, fx.GraphModule)):
            region = cap.regions[0]
            ed = self.editor(region)
            for path, new in self.modules.items():
                ed.set_module(path, new)
            compile_now(region.gm)
            return region.gm
        root = shallow_copy(cap.model)
        unit = Unit()  # the one editor's units, as a fold's: bound to the copy, then applied
        pending = dict(self.modules)
        for rpath, reditor in self.edited.items():
            scope = common_prefix(sorted(self.scopes.get(rpath, {rpath})))
            if scope != rpath and self.redo is not None and covers(rpath, scope):
                part = capture_submodule(cap, scope)
                new = self.redo(cap.model.get_submodule(scope), part.inputs if part else None, scope)
                pending = {p: m for p, m in pending.items() if not covers(scope, p)}
                self._graph_note(scope)
                unit.edits.append(ModuleEdit(scope, new))
                continue
            prefix = rpath + "."
            for path in [p for p in pending if rpath == "" or p.startswith(prefix)]:
                reditor.set_module(path[len(prefix) :] if rpath else path, pending.pop(path))
            region = self.cap_region(rpath)
            compile_now(region.gm)
            self._graph_note(rpath)
            if rpath == "":
                return region.gm
            unit.edits.append(ModuleEdit(rpath, region.gm))
        unit.edits.extend(ModuleEdit(path, new) for path, new in pending.items())
        bind([unit], Editor(root), checks=False)
        unit.apply()
        return root

    def plan(self) -> Plan:
        """The edits as data (module paths, no graph): which modules the one editor would
        replace by what, and which would become their rewritten graph and why."""
        plan = Plan([SwapStep(path, describe_module(new)) for path, new in self.modules.items()])
        for rpath in self.edited:
            scope = common_prefix(sorted(self.scopes.get(rpath, {rpath})))
            plan.steps.append(GraphStep(scope or "<root>", [_GRAPH_WHY]))
        return plan

    def _graph_note(self, path: str, why: str | None = None) -> None:
        why = why or _GRAPH_WHY
        self.report.add(
            finding(
                "FD104",
                f"{path or '<root>'}: replaced by its rewritten graph ({why})",
                None,
                path or None,
            )
        )

    def cap_region(self, path: str) -> Region:
        return next(r for r in self.cap.regions if r.path == path)


def finish(rw: Rewriter, report: Report, model: Any, dry_run: bool) -> RewriteResult:
    """Apply the edits a surgery collected with the one editor, and measure what changed; or,
    for a dry run, return the model untouched with the edits as ``report.extra['plan']``."""
    if dry_run:
        report.plan = rw.plan()
        return RewriteResult(model, report)
    result = rw.build()
    measure(report, model, result, rw.cap.example_inputs)
    return RewriteResult(result, report)


def _refused(
    report: Report, where: str | None, node: str | None, message: str, source: str | None = None
) -> None:
    report.add(finding("SW001", f"{where or node}: {message}", node, where, source))


def _eval_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    m = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    if any(mod.training for mod in m.modules()):
        m = copy.deepcopy(m).eval()
    with torch.no_grad(), buffers_restored(m):
        return [
            t for t in torch.utils._pytree.tree_leaves(m(*own_copies(inputs))) if isinstance(t, torch.Tensor)
        ]


def measure(report: Report, original: Any, result: nn.Module, inputs: tuple[Any, ...] | None) -> None:
    """Verify exact rewrites; measure the output deviation of function-changing ones (eval mode)."""
    changed = [a for a in report.actions if a.kind != "skipped"]
    if inputs is None or not changed:
        if changed:
            report.extra["deviation"] = "not measured: no example inputs"
        return
    if all(a.exact for a in changed):
        check = verify(original, result, inputs, eval_mode=True)
        report.verification = {**check.to_dict(), "summary": check.summary()}
        if not check.passed:
            raise VerificationError(f"an exact rewrite failed verification: {check.summary()}")
        return
    before, after = _eval_outputs(original, inputs), _eval_outputs(result, inputs)
    worst_abs, worst_rel = 0.0, 0.0
    for a, b in zip(before, after):
        if a.shape != b.shape:
            report.extra["deviation"] = f"output shape changed from {tuple(a.shape)} to {tuple(b.shape)}"
            return
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale else diff)
    report.extra["deviation"] = {"max_abs": worst_abs, "max_rel": worst_rel}
    report.add(
        finding(
            "SW002",
            f"the rewrite changes the eval-mode output: max abs deviation {worst_abs:.3g} (relative {worst_rel:.3g})",
        )
    )


def _capture(model: Any, example_inputs: Any, leaf_modules: Iterable[type | str]) -> Capture:
    cap = capture(model, example_inputs, leaf_modules=leaf_modules, check_trace=example_inputs is not None)
    if cap.example_inputs is not None:
        cap.ensure_shapes()
    return cap


def _opaque_modules(cap: Capture) -> list[tuple[str, nn.Module]]:
    """Norm modules called only from code no region covers (swapped/removed without a graph)."""
    return [(o.module_path, o.module) for o in opaque_norms(cap)]


def _insert_module_node(
    rw: Rewriter, region: Region, anchor: fx.Node, name: str, module: nn.Module
) -> fx.Node:
    rw.editor(region, anchor).set_module(name, module)
    graph = region.gm.graph
    with graph.inserting_after(anchor):
        new = graph.call_module(name, (anchor,))
    anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def norm_nodes(cap: Capture) -> list[tuple[Region, fx.Node, BNSite | OtherNormSite]]:
    """Every norm application in the captured graphs, in graph order (collected up front, so
    the graphs may be edited while iterating)."""
    bns, others = find_norms(cap)
    sites: list[tuple[Region, fx.Node, BNSite | OtherNormSite]] = [(s.region, s.call, s) for s in bns]  # type: ignore[misc]
    sites += [(o.region, o.node, o) for o in others]
    order = {id(n): i for r in cap.regions for i, n in enumerate(r.gm.graph.nodes)}
    regions = {r.path: k for k, r in enumerate(cap.regions)}
    return sorted(sites, key=lambda t: (regions[t[0].path], order[id(t[1])]))


def owned_norm(rw: Rewriter, region: Region, site: BNSite) -> tuple[str, Rest] | None:
    """For a functional batch_norm that a norm module applies to its own statistics as the
    first thing its forward does (a BatchNorm subclass with an activation, an in-place-ABN
    style module): the module's path and what the rest of its forward is. A rewrite then
    replaces that module by the new norm followed by the rest, keeping the activation."""
    call, node = site.call, site.node
    if call is None or node is None or call.op != "call_function" or (not region.path and not call.meta):
        return None
    stack = call.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    local = stack_path(list(stack.values())[-1][0])
    path = f"{region.path}.{local}" if region.path and local else (region.path or local)
    module = rw._module_at(path)
    attrs = {str(n.target).rpartition(".")[0] for n in call.all_input_nodes if n.op == "get_attr"}
    if module is None or not local or attrs != {local} or not norm_with_stats(module):
        return None
    index = ops_by_module(region)
    if site.input is not None and site.input in set(index.get(local, [])):
        return None  # the forward does something before normalizing: no module chain expresses it
    rest = rest_of(region, local, module, index, frozenset({call, node, *site.extra}))
    return (path, rest) if rest.module is not None else None


def collapse(region: Region, path: str, site: BNSite, rest: Rest) -> None:
    """Make the module's whole computation one call of the module at ``path`` in the region's
    graph, so the graph agrees with the module that replaces it there."""
    graph = region.gm.graph
    local = path[len(region.path) + 1 :] if region.path else path
    out = rest.output or site.node
    assert out is not None and site.input is not None
    with graph.inserting_after(out):
        new = graph.call_module(local, (site.input,))
    out.replace_all_uses_with(new)
    new.args = (site.input,)
    attrs: list[fx.Node] = []
    for n in reversed([site.call, site.node, *site.extra, *rest.nodes]):
        if n is not None and not n.users and not getattr(n, "_erased", False):
            attrs.extend(a for a in n.all_input_nodes if a.op == "get_attr")
            graph.erase_node(n)
    for a in attrs:  # the module's own tensors: it is replaced, they are gone with it
        if not a.users and not getattr(a, "_erased", False):
            graph.erase_node(a)


def _followed_by(new: nn.Module, rest: Rest) -> nn.Module:
    """``new`` then the rest of the replaced norm module's forward."""
    if isinstance(rest.module, nn.Identity):
        return new
    tail = list(rest.module) if isinstance(rest.module, nn.Sequential) else [rest.module]
    return nn.Sequential(new, *tail)


def selected_norm(
    region: Region, node: fx.Node, selector: Selector
) -> tuple[BNSite | None, str | None, str] | None:
    """(BatchNorm site or None for another norm, module path, kind) of the norm ``node``
    applies, when the selector picks it; None otherwise."""
    site = bn_site(region, node)
    other = None if site is not None else other_norm_site(region, node)
    if site is None and other is None:
        return None
    path = region.module_path(node)
    kind = site.kind if site is not None else other.kind  # type: ignore[union-attr]
    return (site, path, kind) if selector.matches(path, kind) else None


def _erase_bn(region: Region, site: BNSite, replacement: fx.Node) -> None:
    """Route the BatchNorm's users to ``replacement`` and drop the BatchNorm call."""
    assert site.node is not None and site.call is not None
    site.node.replace_all_uses_with(replacement)
    graph = region.gm.graph
    if site.node is not site.call:
        graph.erase_node(site.node)
    graph.erase_node(site.call)
