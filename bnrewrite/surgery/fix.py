"""``fix``: the automatic fixes lint rules offer (BN001: a bias before a BatchNorm)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bnrewrite.capture.capture_model import Region
from bnrewrite.diagnostics import Action, Report
from bnrewrite.editor.edit import shallow_copy
from bnrewrite.errors import UsageError
from bnrewrite.fold import RewriteResult
from bnrewrite.select import Selector
from bnrewrite.semantics.layers import layer_site
from bnrewrite.semantics.norms import (
    bn_site,
)
from bnrewrite.semantics.readers import value_readers
from bnrewrite.surgery.rewriter import (
    Rewriter,
    _capture,
    _refused,
    finish,
    owned_norm,
)

# -- fix -----------------------------------------------------------------------------------------

FIXABLE = ("BN001",)


def fix(
    model: Any,
    codes: Iterable[str] | str = FIXABLE,
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
    dry_run: bool = False,
) -> RewriteResult:
    """Apply the fixes analysis rules offer. BN001: drop a conv/linear bias that feeds a
    BatchNorm and absorb it into the BatchNorm's running mean (exact in eval and in training)."""
    wanted = {c.strip().upper() for c in ([codes] if isinstance(codes, str) else codes)}
    unknown = wanted - set(FIXABLE)
    if unknown:
        raise UsageError(f"no automatic fix for {', '.join(sorted(unknown))}; fixable: {', '.join(FIXABLE)}")
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("fix", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            fix(sub, codes, select=selector.under(at), example_inputs=x, leaf_modules=leaf_modules).model
        ),
    )
    for region in cap.regions:
        calls: dict[str, int] = {}
        for n in region.gm.graph.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        for node in list(region.gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            site = bn_site(region, node)
            if site is None or site.input is None or len(value_readers(site.input)) != 1:
                continue
            layer = layer_site(region, site.input)
            if layer is None or layer.bias is None:
                continue
            if not selector.matches(site.module_path, site.kind) and not selector.matches(
                layer.module_path, type(layer.module).__name__ if layer.module is not None else layer.kind
            ):
                continue
            _absorb_bias(rw, report, region, site, layer, calls)
    return finish(rw, report, model, dry_run)


def _absorb_bias(
    rw: Rewriter, report: Report, region: Region, site: Any, layer: Any, calls: dict[str, int]
) -> None:
    label = layer.module_path or layer.name
    owned = owned_norm(rw, region, site) if site.module is None else None
    owner, owner_path = (rw._module_at(owned[0]), owned[0]) if owned else (site.module, site.module_path)
    if layer.module is None or owner is None:
        _refused(
            report, label, layer.name, "BN001 fix needs module layers (functional convs/BNs are left alone)"
        )
        return
    if calls.get(str(layer.node.target), 0) > 1 or (
        site.module is not None and calls.get(str(site.call.target), 0) > 1
    ):
        _refused(
            report,
            label,
            layer.name,
            "module called at several places: dropping its bias would change the other calls",
        )
        return
    if layer.bias.shape[0] != site.num_features:
        _refused(report, label, layer.name, "bias and BatchNorm channel counts differ")
        return
    conv = shallow_copy(layer.module)
    conv._parameters["bias"] = None
    bn = shallow_copy(owner)
    if site.running_mean is not None:
        bn._buffers["running_mean"] = (
            site.running_mean.detach() - layer.bias.detach().to(site.running_mean.dtype)
        ).clone()
    rw.replace_module(layer.module_path, conv)
    rw.replace_module(owner_path, bn)
    report.actions.append(
        Action(
            "fix",
            layer.name,
            label,
            f"BN001: bias of {label} dropped and absorbed into {owner_path}.running_mean",
            target=owner_path,
            exact=True,
            code="BN001",
        )
    )
