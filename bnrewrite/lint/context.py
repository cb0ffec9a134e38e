"""What every rule gets: the capture, the norm sites found in it, and its networkx view."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from torch import fx, nn

from bnrewrite.capture.capture_model import Capture, Region
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Diagnostic
from bnrewrite.semantics.norms import BNSite, OtherNormSite
from bnrewrite.semantics.ops import source_line
from bnrewrite.semantics.view import to_networkx

if TYPE_CHECKING:
    import networkx as nx


@dataclass
class RuleContext:
    cap: Capture
    bn_sites: list[BNSite]
    other_norms: list[OtherNormSite] = field(default_factory=list)

    @cached_property
    def view(self) -> nx.DiGraph:
        """The networkx view of every region, built on first use: a rule that walks paths
        queries it; the built-in rules read the sites and need none."""
        return to_networkx(self.cap)

    def diagnostic(self, code: str, message: str, region: Region, node: fx.Node) -> Diagnostic:
        """A diagnostic for ``node``: its code's severity, node name, module path, source line."""
        path = existing_path(self.cap.model, region.module_path(node))
        where = path or region.qualify(node.name)
        return finding(
            code,
            f"{where}: {message}",
            region.qualify(node.name),
            path,
            source_line(node),
        )


def existing_path(model: object, path: str | None) -> str | None:
    """``path`` if the model has a module there, else its longest prefix that exists (a
    diagnostic must name a module the user can find with ``get_submodule``)."""
    if path is None or not isinstance(model, nn.Module):
        return path
    parts = path.split(".")
    while parts:
        try:
            model.get_submodule(".".join(parts))
            return ".".join(parts)
        except AttributeError:
            parts.pop()
    return None


Rule = Callable[[RuleContext], Iterable[Diagnostic]]
