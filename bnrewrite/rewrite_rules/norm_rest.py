"""What remains of a norm module's forward once its normalization is folded away.

Matches: a module whose forward applies one batch_norm (absorbed by a fold, or replaced by a
swap) and possibly more - dropout, an activation, a cast - as the captured graph shows it: the
ops whose ``nn_module_stack`` holds the module, minus the ones the fold erased.

Guarantees: the replacement computes exactly what the rest of the module's forward computed on
the normalized value: ``nn.Identity`` when nothing remains; the user's own children in an ``nn.Sequential`` when the rest is a chain of them (``Sequential(m.drop, m.act)``); otherwise a
GraphModule of the remaining ops rooted at the module (reported as FD104). A rest that reads
anything but the normalized value and the module's own tensors is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from bnrewrite.capture.capture_model import Region
from bnrewrite.semantics.ops import module_at, stack_path


@dataclass
class Rest:
    """The replacement of a norm module whose normalization went elsewhere."""

    module: nn.Module | None  # None: no module can express the rest (see ``why``)
    graph: bool = False  # True: a GraphModule of the remaining ops (FD104)
    why: str = ""
    kept: list[str] = field(default_factory=list)  # what the module still does, for the report
    nodes: list[fx.Node] = field(default_factory=list)  # the remaining ops
    output: fx.Node | None = None  # the one whose value the module returns (None: nothing remains)

    def describe(self) -> str:
        return ", ".join(self.kept)


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    values = list(stack.values())
    return stack_path(values[-1][0]) if values else None


def _op_name(node: fx.Node, region: Region) -> str:
    if node.op == "call_module":
        return type(module_at(region.gm, str(node.target))).__name__
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if node.op == "call_method":
        return f".{target}()"
    return str(getattr(target, "__name__", target)).rpartition(".")[2]


def ops_by_module(region: Region) -> dict[str, list[fx.Node]]:
    """Region-local module path -> the ops still in the graph that its forward ran (in order,
    its children's included), from one walk of the graph."""
    index: dict[str, list[fx.Node]] = {}
    for n in region.gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        for path in {stack_path(v[0]) for v in stack.values()}:
            index.setdefault(path, []).append(n)
    return index


def rest_of(
    region: Region,
    local: str,
    module: nn.Module,
    index: dict[str, list[fx.Node]],
    gone: frozenset[fx.Node] = frozenset(),
) -> Rest:
    """The module that replaces ``module`` (at region-local ``local``) once its batch_norm is
    gone from the region's graph (erased, or listed in ``gone``: then the normalized value is
    the batch_norm's output); ``index`` from :func:`ops_by_module`. See the module doc."""
    ops = [n for n in index.get(local, []) if n not in gone]
    members = set(ops)
    outputs = [n for n in ops if any(u not in members and u not in gone for u in n.users)]
    group = _feeding(outputs, members)  # input checks and buffer updates go with the norm
    if not group:
        return Rest(nn.Identity())
    members = set(group)
    external = {a for n in group for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    kept = [_op_name(n, region) for n in group]
    if len(external) != 1 or len(outputs) != 1:
        return Rest(None, why=f"the rest of {type(module).__name__}.forward ({', '.join(kept)}) reads or "
                    "returns more than the normalized value")  # fmt: skip
    chain = _child_chain(group, local, next(iter(external)), outputs[0])
    if chain is not None:
        children = [module.get_submodule(name) for name in chain]
        kept = [type(c).__name__ for c in children]
        return Rest(chain_of(module, chain), kept=kept, nodes=group, output=outputs[0])
    gm, why = _rest_graph(group, local, module, next(iter(external)), outputs[0])
    if gm is None:
        return Rest(None, why=why)
    return Rest(gm, graph=True, kept=kept, nodes=group, output=outputs[0])


def _feeding(outputs: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    """The members that the outputs depend on, in graph order."""
    keep: set[fx.Node] = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n in keep or n not in members:
            continue
        keep.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in members_in_order(members) if n in keep]


def members_in_order(members: set[fx.Node]) -> list[fx.Node]:
    if not members:
        return []
    graph = next(iter(members)).graph
    return [n for n in graph.nodes if n in members]


REST_ATTR = "_bnrewrite_rest"  # on the Sequential: the names of the children it chains


def chain_of(module: nn.Module, names: list[str]) -> nn.Sequential:
    """``nn.Sequential`` of the module's own children (the user's objects, not copies), marked
    with their names so a state_dict of the result can be loaded into a freshly built model."""
    seq = nn.Sequential(*[module.get_submodule(name) for name in names])
    setattr(seq, REST_ATTR, list(names))
    return seq


def _child_chain(group: list[fx.Node], local: str, entry: fx.Node, out: fx.Node) -> list[str] | None:
    """Names of the module's direct children when the rest applies them one after another."""
    prefix = f"{local}." if local else ""
    names: list[str] = []
    current = entry
    i = 0
    seen: set[str] = set()
    while i < len(group):
        inner = _innermost(group[i])
        if inner is None or not inner.startswith(prefix) or "." in inner[len(prefix) :] or inner in seen:
            return None  # an op of the module's own forward, a grandchild's, or a child called twice
        seen.add(inner)
        j = i
        while j < len(group) and _innermost(group[j]) == inner:
            j += 1
        span = group[i:j]
        ins = {a for n in span for a in n.all_input_nodes if a not in span and a.op != "get_attr"}
        if ins != {current} or any(u not in span for n in span[:-1] for u in n.users):
            return None
        names.append(inner[len(prefix) :])
        current = span[-1]
        i = j
    return names if current is out else None


def _rest_graph(
    group: list[fx.Node], local: str, module: nn.Module, entry: fx.Node, out: fx.Node
) -> tuple[fx.GraphModule | None, str]:
    """A GraphModule rooted at ``module`` computing the remaining ops from the normalized value."""
    prefix = f"{local}." if local else ""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {entry: graph.placeholder("x")}
    for n in group:
        for a in n.all_input_nodes:
            if a in env:
                continue
            if a.op != "get_attr" or not str(a.target).startswith(prefix):
                return None, f"the rest of {type(module).__name__}.forward reads {a.name}, not its own"
            env[a] = graph.get_attr(str(a.target)[len(prefix) :])
        if n.op == "call_module" and not str(n.target).startswith(prefix):
            return None, f"the rest of {type(module).__name__}.forward calls {n.target}"
        new = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module":
            new.target = str(n.target)[len(prefix) :]
        env[n] = new
    graph.output(env[out])
    gm = fx.GraphModule(module, graph, f"{type(module).__name__}Rest")
    gm.training = module.training
    return gm, ""
