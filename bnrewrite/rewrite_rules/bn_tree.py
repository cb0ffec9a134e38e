"""Pass: carry the folds planned on a graph over into the user's own module tree.

Matches: every rewrite the graph pass applied (:class:`~bnrewrite.rewrite_rules.fold_bn.Applied`).

Guarantees: where a rewrite can be expressed as a module edit, the returned model is the user's
own module tree (their class, ``forward``, output types and signature): a folded conv/linear
module gets its new ``weight`` and ``bias`` (created when it had none), an absorbed BatchNorm
module becomes ``nn.Identity``, a BatchNorm kept as scale-and-shift becomes ``ChannelAffine``.
A module edit expresses a rewrite when the BatchNorm and every changed layer are modules in
the tree (``nn.BatchNorm*``/frozen BN, ``nn.Conv*``/``nn.Linear``), each called exactly once
(counted in the eager pass, or in the graph without example inputs), and the graph op maps to
that module (module call, or ``nn_module_stack`` plus parameter name in an ATen graph).
Everything else (a functional ``F.batch_norm``, a conv shared between call sites, a module
called several times) is carried by replacing the smallest enclosing module with its own folded
graph, reported with FD104 and the reason. Every change is an :class:`Edit` that can be undone,
grouped in :class:`Unit` s (all edits touching one layer together) for the proof's rollback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from bnrewrite.capture.capture_model import Capture, Region
from bnrewrite.editor.units import CheckSpec, ModuleEdit, ParamEdit, Unit, common_prefix, merge_units
from bnrewrite.plan.decision import PRECEDING
from bnrewrite.rewrite_rules.fold_bn import Applied
from bnrewrite.rewrite_rules.norm_rest import Rest, ops_by_module, rest_of
from bnrewrite.semantics.norms import (
    is_batchnorm_module,
    is_frozen_bn_module,
    is_norm_module,
    is_plain_norm_module,
    norm_with_stats,
)
from bnrewrite.semantics.ops import stack_path

CONTRADICTED = "the eager run contradicts the graph"


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix and local else (prefix or local)


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [stack_path(v[0]) for v in stack.values()]


def node_scope(module_at: Callable[[str], nn.Module | None], region: Region, node: fx.Node) -> str:
    """The module whose own code runs ``node``: the innermost module on its stack that is not a
    layer (norm, conv, linear) itself; the region's root when the graph recorded no stack."""
    for local in reversed(_stack_paths(node)):
        path = _join(region.path, local)
        module = module_at(path)
        if module is not None and not (is_norm_module(module) or isinstance(module, (_ConvNd, nn.Linear))):
            return path
    return region.path


class TreePlanner:
    """Turns one region's applied rewrites into units of module-tree edits, or graph needs."""

    def __init__(self, cap: Capture, region: Region, graph_calls: Counter[str]) -> None:
        self.cap = cap
        self.region = region
        self.root: nn.Module = cap.model
        self.graph_calls = graph_calls
        self.not_run: set[str] = set()
        self.contradicted: list[tuple[Applied, str]] = []  # folds the eager run disproves
        self._outputs: dict[str, set[int]] = {}  # layer -> ids of the values it now computes
        self._modules: dict[str, nn.Module] | None = None
        self._ops: dict[str, list[fx.Node]] | None = None
        self._stored_readers: dict[str, list[str]] | None = None  # module path -> nodes reading its tensors

    def module(self, path: str) -> nn.Module | None:
        """The user's module at ``path`` (one walk of the tree, then a lookup)."""
        if self._modules is None:
            self._modules = dict(self.root.named_modules(remove_duplicate=False))
        return self._modules.get(path)

    def calls(self, path: str) -> int:
        """How often the module at ``path`` runs: counted in the eager pass, or in the graphs
        where there was none or the example inputs never reached it (see ``not_run``)."""
        rec = self.cap.recording
        if rec is not None and rec.calls.get(path, 0) > 0:
            return rec.calls[path]
        if rec is not None:
            self.not_run.add(path)
        return self.graph_calls.get(path, 0)

    # -- where a graph op lives in the tree ----------------------------------------------------
    def _owner_of_attr(self, node: fx.Node | None, suffix: str) -> str | None:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        target = str(node.target)
        if not target.endswith("." + suffix):
            return None
        return _join(self.region.path, target[: -len(suffix) - 1])

    def _innermost(self, node: fx.Node) -> str | None:
        paths = _stack_paths(node)
        return _join(self.region.path, paths[-1]) if paths else None

    def bn_path(self, a: Applied) -> tuple[str | None, str]:
        """The tree path of the module whose BatchNorm ``a`` rewrote, or why there is none: a
        BatchNorm module call, a frozen BN's ops, or a functional batch_norm that a module
        applies to its own statistics in its own forward (what else that forward does stays)."""
        call = a.bn_call
        site = a.decision.site
        functional = False
        if call.op == "call_module" and site.module is not None:
            path = _join(self.region.path, str(call.target))
        elif call.op == "call_function" and site.frozen:  # frozen BN, op by op in an ATen graph
            path = self._innermost(call) or ""
        elif call.op == "call_function" and site.module is None:
            owners = {_join(self.region.path, t.rpartition(".")[0]) for t in a.bn_attrs if "." in t}
            path = owners.pop() if len(owners) == 1 and len(a.bn_attrs) >= 2 else None
            module = self.module(path) if path is not None else None
            if module is None or not norm_with_stats(module) or self._innermost(call) != path:
                return None, "a functional batch_norm (no module of its own to replace)"
            functional = True
        else:
            return None, "a functional batch_norm (no module of its own to replace)"
        module = self.module(path)
        known = functional or site.frozen or is_batchnorm_module(module) or is_frozen_bn_module(module)
        if module is None or not known:
            return None, f"{path} is not a BatchNorm module of the model"
        n = self.calls(path)
        if n != 1:
            return None, f"BatchNorm module {path} is called {n} times"
        return path, ""

    def layer_path(self, node: fx.Node, copied: str | None) -> tuple[str | None, str]:
        """The tree path of the conv/linear module a fold changed, or why there is none."""
        if copied is not None:
            return None, "the layer is shared between call sites (a folded copy per call site)"
        if node.op == "call_module":
            path = _join(self.region.path, str(node.target))
        else:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            path = self._owner_of_attr(weight, "weight")
            if path is None or self._innermost(node) != path:
                return None, f"{node.name} is a functional conv/linear on computed or foreign weights"
        module = self.module(path)
        if not isinstance(module, (_ConvNd, nn.Linear)):
            return None, f"{path} is not a conv/linear module"
        n = self.calls(path)
        if n != 1:
            return None, f"layer {path} is called {n} times"
        return path, ""

    def scope(self, node: fx.Node) -> str:
        return node_scope(self.module, self.region, node)

    # -- planning ------------------------------------------------------------------------------
    def plan(self, applied: list[Applied]) -> tuple[list[Unit], list[tuple[str, str, Applied]]]:
        """Units of tree edits, and (enclosing module, reason, rewrite) for the rest."""
        units: list[Unit] = []
        needs: list[tuple[str, str, Applied]] = []
        for a in applied:
            unit, reason = self._unit(a)
            if unit is not None:
                units.append(unit)
                continue
            if reason is CONTRADICTED:
                continue  # the graph is wrong here: neither a tree edit nor a graph may apply it
            nodes = [a.bn_call] + [n for n, _s, _c in a.layers]
            for n, _s, copied in a.layers:
                if copied is not None and n.op == "call_module":  # every call site of the shared module
                    nodes += [
                        m for m in self.region.gm.graph.nodes if m.op == "call_module" and m.target == copied
                    ]
            scopes = [self.scope(n) for n in nodes]
            needs.append((common_prefix(scopes), reason, a))
        return merge_units(units), needs

    def _unit(self, a: Applied) -> tuple[Unit | None, str]:
        bn, why = self.bn_path(a)
        if bn is None:
            return None, why
        layers = []
        for node, slot, copied in a.layers:
            path, why = self.layer_path(node, copied)
            if path is None:
                return None, why
            layers.append((path, slot))
        rec = self.cap.recording
        misread = self._misread(a, bn, [p for p, _ in layers])
        if misread:
            self.contradicted.append((a, misread))
            return None, CONTRADICTED
        direct = a.decision.verdict == PRECEDING and a.decision.combine is None
        if rec is not None and direct and bn in rec.in_ids:
            # The BatchNorm must read the layer's output, or that of a BatchNorm already folded
            # into the layer (a chain folded to a fixed point).
            layer = layers[0][0]
            seen = self._outputs.setdefault(layer, {rec.out_ids[layer]} if layer in rec.out_ids else set())
            if seen and rec.in_ids[bn] not in seen:
                self.contradicted.append((a, f"in the eager run, {bn} does not read {layer}'s output"))
                return None, CONTRADICTED
            if bn in rec.out_ids:
                seen.add(rec.out_ids[bn])
        readers = self._reads_of_stored(bn)
        if readers:
            return None, f"other code reads {bn}'s stored tensors ({readers})"
        replacement, rest = self._replacement(a, bn)
        if replacement is None:
            return None, rest.why
        paths = {bn, *(p for p, _ in layers)}
        unit = Unit(actions=[a.action], paths=paths, proven=not (paths & self.not_run))
        unit.edits.append(ModuleEdit(bn, replacement))
        if rest.kept:
            a.action.detail += f"; {bn} keeps the rest of its forward ({rest.describe()})"
        if rest.graph:
            unit.graph_rests.append(
                (bn, f"the rest of its forward ({rest.describe()}) is no chain of its own modules")
            )
        for path, slot in layers:
            unit.edits.append(ParamEdit(path, slot.tensors))
        for (path, _slot), absorbed in zip(layers, a.absorbed):
            unit.specs.append(CheckSpec("layer", path, absorbed=[absorbed]))
        if a.affine is not None:
            unit.specs.append(CheckSpec("slot", bn, mode="direct", axis=a.decision.site.axis))
        elif a.bn_affine is not None and a.decision.verdict == PRECEDING:
            unit.specs.append(CheckSpec("slot", bn, affine=a.bn_affine, axis=a.bn_affine.axis))
        return unit, ""

    def _reads_of_stored(self, bn: str) -> str:
        """The nodes that still read the BatchNorm module's parameters or buffers once its call
        is folded away (DBB's BatchNorm-and-pad reads ``bn.bias`` to pad with): replacing the
        module would take those tensors from them."""
        if self._stored_readers is None:
            self._stored_readers = {}
            for n in self.region.gm.graph.nodes:
                if n.op == "get_attr" and n.users:
                    owner = str(n.target).rpartition(".")[0]
                    self._stored_readers.setdefault(owner, []).extend(u.name for u in n.users)
        local = bn[len(self.region.path) + 1 :] if self.region.path else bn
        return ", ".join(self._stored_readers.get(local, [])[:3])

    def _misread(self, a: Applied, bn: str, layers: list[str]) -> str:
        """Why the eager run contradicts the graph's consumers of the values the fold changes:
        a layer that absorbs a BatchNorm after it must feed nothing else; a BatchNorm absorbed
        by the layers after it must feed nothing but them. Empty when it does not."""
        rec = self.cap.recording
        if rec is None:
            return ""
        if a.decision.verdict == PRECEDING:
            for layer in layers:
                n = rec.readers.get(layer, 1) if layer in rec.out_ids else 1
                if n > 1:
                    return (
                        f"in the eager run, {layer}'s output is read {n} times (the graph shows one reader)"
                    )
        elif a.decision.verdict != PRECEDING and a.affine is None and bn in rec.out_ids:
            n, want = rec.readers.get(bn, 0), len(a.decision.entries)
            if n > want:
                return f"in the eager run, {bn}'s output is read {n} times (the graph shows {want})"
        return ""

    def _replacement(self, a: Applied, bn: str) -> tuple[nn.Module | None, Rest]:
        """What takes the BatchNorm module's place: the scale-and-shift or nothing, followed by
        whatever else its forward does (an activation, dropout, ...)."""
        module = self.module(bn)
        assert module is not None
        rest = Rest(nn.Identity())
        if a.bn_call.op != "call_module" or not is_plain_norm_module(module):
            if self._ops is None:
                self._ops = ops_by_module(self.region)
            local = bn[len(self.region.path) + 1 :] if self.region.path else bn
            rest = rest_of(self.region, local, module, self._ops)
        if rest.module is None:
            return None, rest
        if a.affine is None:
            return rest.module, rest
        if isinstance(rest.module, nn.Identity):
            return a.affine, rest
        tail = list(rest.module) if isinstance(rest.module, nn.Sequential) else [rest.module]
        return nn.Sequential(a.affine, *tail), rest
