"""What every rule gets: the capture, its networkx view, and the norm sites found in it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from .. import codes
from ..diagnostics import Diagnostic
from ..graph.capture import Capture, Region, source_line
from ..graph.norms import BNSite, OtherNormSite


@dataclass
class RuleContext:
    cap: Capture
    view: nx.DiGraph
    bn_sites: list[BNSite]
    other_norms: list[OtherNormSite] = field(default_factory=list)

    def diagnostic(self, code: str, message: str, region: Region, node: fx.Node) -> Diagnostic:
        """A diagnostic for ``node``: its code's severity, node name, module path, source line."""
        path = region.module_path(node)
        where = path or region.qualify(node.name)
        return Diagnostic(
            code,
            codes.get(code).severity,
            f"{where}: {message}",
            region.qualify(node.name),
            path,
            source_line(node),
        )


Rule = Callable[[RuleContext], Iterable[Diagnostic]]
