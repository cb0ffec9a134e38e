"""What a capture is: the graphs of a model (:class:`Region` s, each where it sits in the
model), the parts no graph covers, the example inputs and the eager recording."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from bnrewrite.diagnostics import OpaquePart
from bnrewrite.semantics.ops import propagate_shapes, stack_path

if TYPE_CHECKING:  # (the recording pass is capture's; only its type is named here)
    from bnrewrite.capture.recording import Recording


@dataclass
class Region:
    """One captured graph and where it sits in the original model."""

    path: str
    gm: fx.GraphModule
    dialect: str
    inputs: tuple[Any, ...] | None = None
    shapes_known: bool = False

    def qualify(self, name: str) -> str:
        """A node name unique across regions."""
        return f"{self.path}/{name}" if self.path else name

    def module_path(self, node: fx.Node) -> str | None:
        """The dotted path, in the original model, of the module this node belongs to."""
        local: str | None = None
        if node.op == "call_module":
            local = str(node.target)
        elif node.op == "get_attr":
            local = str(node.target).rpartition(".")[0]
        else:
            stack = node.meta.get("nn_module_stack")
            if stack:
                local = stack_path(list(stack.values())[-1][0])
            else:  # functional call on stored tensors: the module that owns them
                attrs = [n for n in node.all_input_nodes if n.op == "get_attr"]
                local = str(attrs[-1].target).rpartition(".")[0] if attrs else None
        if local is None:
            return self.path or None
        if self.path and local:
            return f"{self.path}.{local}"
        return self.path or local


@dataclass
class Capture:
    """The graphs of a model plus the parts that could not be captured."""

    model: Any
    regions: list[Region]
    opaque: list[OpaquePart] = field(default_factory=list)
    example_inputs: tuple[Any, ...] | None = None
    recording: Recording | None = None
    how: str = "symbolic_trace"  # symbolic_trace | torch.export | parts | program | graph
    leaf_modules: tuple[type | str, ...] = ()
    eager_passes: int = 0  # forward passes of the whole model run to capture it (recordings)

    def __post_init__(self) -> None:
        if self.recording is not None and not self.eager_passes:
            self.eager_passes = 1

    @property
    def dialect(self) -> str:
        return self.regions[0].dialect if self.regions else "module"

    @property
    def whole(self) -> bool:
        """True when the whole model is a single graph."""
        return len(self.regions) == 1 and self.regions[0].path == ""

    def graph_calls(self) -> Counter[str]:
        """How often the graphs call each module (by its path in the model)."""
        calls: Counter[str] = Counter()
        for region in self.regions:
            for n in region.gm.graph.nodes:
                if n.op == "call_module":
                    calls[f"{region.path}.{n.target}" if region.path else str(n.target)] += 1
        return calls

    def shape_lookup(self) -> Any:
        """One :class:`~bnrewrite.semantics.shapes.ShapeLookup` per capture (shapes are found once)."""
        from bnrewrite.semantics.shapes import ShapeLookup

        if getattr(self, "_shapes", None) is None:
            self._shapes = ShapeLookup(self)
        return self._shapes

    def tied_parameters(self) -> set[str]:
        """``path.weight``/``path.bias`` of every parameter more than one module holds (an LM
        head tied to the embeddings): folded values written there would change the other too."""
        if not isinstance(self.model, nn.Module):
            return set()
        holders: dict[int, list[str]] = {}
        for path, module in self.model.named_modules():
            for name, t in module._parameters.items():
                if t is not None:
                    holders.setdefault(id(t), []).append(f"{path}.{name}" if path else name)
        return {p for paths in holders.values() if len(paths) > 1 for p in paths}

    def runs(self, path: str, graph_calls: Counter[str]) -> int:
        """How often the module at ``path`` runs: counted in the eager pass where it ran, else in
        the graphs (once where neither calls it as a module: its ops are inlined)."""
        rec = self.recording
        if rec is not None and rec.calls.get(path, 0) > 0:
            return rec.calls[path]
        return graph_calls.get(path, 1)

    def ensure_shapes(self) -> bool:
        """Propagate shapes through every region that has example inputs; True if all did."""
        ok = True
        for region in self.regions:
            if region.shapes_known:
                continue
            if region.dialect == "aten":
                region.shapes_known = True
                continue
            if region.inputs is None:
                ok = False
                continue
            propagate_shapes(region.gm, region.inputs)
            region.shapes_known = True
        return ok
