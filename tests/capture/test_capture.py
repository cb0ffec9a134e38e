import pytest
import torch
from torch import nn

from bnrewrite.capture import capture
from bnrewrite.capture.capture_model import export_blocker
from bnrewrite.semantics.ops import node_shape
from bnrewrite.semantics.view import to_networkx
from tests.conftest import assert_unchanged, load_sample, randomize_bn, state_snapshot


def test_whole_model_is_one_region():
    model, inputs = load_sample("resnet")
    cap = capture(model, inputs)
    assert cap.whole and cap.dialect == "module" and not cap.opaque


def test_untraceable_model_is_captured_in_its_traceable_parts():
    model, inputs = load_sample("untraceable")
    cap = capture(model, inputs)
    assert sorted(r.path for r in cap.regions) == ["gate.bright", "gate.dark", "head", "stem"]
    opaque = {o.module_path: o.reason for o in cap.opaque}
    assert set(opaque) == {"", "gate"}
    assert "TraceError" in opaque[""]


def test_region_inputs_and_shapes_come_from_one_run():
    model, inputs = load_sample("untraceable")
    cap = capture(model, inputs)
    assert not cap.ensure_shapes()  # only one branch of the gate ran on the example input
    ran = {r.path: r.inputs is not None for r in cap.regions}
    assert ran["stem"] and ran["head"] and ran["gate.bright"] != ran["gate.dark"]
    head = next(r for r in cap.regions if r.path == "head")
    out = next(n for n in head.gm.graph.nodes if n.op == "output").args[0]
    assert node_shape(out) == (2, 4)


def test_exported_program_is_the_aten_dialect():
    model, inputs = load_sample("mlp")
    ep = torch.export.export(model, inputs)
    cap = capture(ep)
    assert cap.dialect == "aten" and cap.example_inputs is not None
    targets = {str(n.target) for n in cap.regions[0].gm.graph.nodes if n.op == "call_function"}
    assert "aten.batch_norm.default" in targets


def test_shape_propagation_does_not_touch_training_stats():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    snap = state_snapshot(model)
    cap = capture(model, (torch.randn(2, 3, 8, 8),))
    cap.ensure_shapes()
    assert_unchanged(model, snap)
    assert node_shape(list(cap.regions[0].gm.graph.nodes)[-2]) == (2, 4, 6, 6)


def test_networkx_view_mirrors_the_graph():
    model, inputs = load_sample("resnet")
    cap = capture(model, inputs)
    cap.ensure_shapes()
    view = to_networkx(cap)
    gm = cap.regions[0].gm
    assert set(view.nodes) == {n.name for n in gm.graph.nodes}
    attrs = view.nodes["layers_0_bn1"]
    assert attrs["module_path"] == "layers.0.bn1"
    assert attrs["module_type"] == "BatchNorm2d"
    assert attrs["shape"] == [2, 16, 32, 32]
    assert attrs["source"] and attrs["source"].endswith(".py:" + attrs["source"].rsplit(":", 1)[1])
    assert ("layers_0_conv1", "layers_0_bn1") in view.edges


def test_leaf_modules_are_kept_whole():
    model, inputs = load_sample("resnet")
    cap = capture(model, inputs, leaf_modules=["layers.0"])
    assert any(n.op == "call_module" and n.target == "layers.0" for n in cap.regions[0].gm.graph.nodes)


def test_ladder_uses_export_where_fx_cannot_read_the_model():
    model, inputs = load_sample("same_padding")
    cap = capture(model, inputs)
    assert cap.how == "torch.export" and cap.whole and cap.dialect == "aten"
    assert not cap.opaque


def test_parts_descend_through_module_lists_and_dicts():
    model, inputs = load_sample("module_lists")
    cap = capture(model, inputs)
    assert cap.how == "parts"
    assert sorted(r.path for r in cap.regions) == [
        "heads.edge",
        "heads.seg",
        "stages.0",
        "stages.1",
        "stages.2",
    ]
    assert {o.module_path for o in cap.opaque} == {""}  # containers are not opaque parts


def test_one_eager_pass_records_calls_shapes_kwargs_and_outputs():
    model, inputs = load_sample("kwargs_dataclass")
    cap = capture(model, inputs)
    rec = cap.recording
    assert rec is not None and cap.how == "parts"
    assert rec.calls["block1.bn"] == 1 and rec.out_shapes["classifier.1"] == (2, 6)
    _args, kwargs = rec.inputs["block2"]
    assert kwargs["scale"] == 2.0 and kwargs["shift"] is model.offset
    block2 = next(r for r in cap.regions if r.path == "block2")
    assert block2.inputs is not None and len(block2.inputs) == 3  # kwargs bound by name
    assert type(rec.outputs).__name__ == "Output"


def test_swap_knows_shapes_of_layers_no_graph_covers():
    from bnrewrite import swap

    model, inputs = load_sample("untraceable")
    swapped, report = swap(model, "gn", example_inputs=inputs, select="post_bn")
    assert isinstance(swapped.post_bn, nn.GroupNorm), [d.message for d in report.diagnostics]


def _export_fails(module, args) -> bool:
    try:
        torch.export.export(module, tuple(args), strict=False)
    except Exception:
        return True
    return False


@pytest.mark.parametrize("name", ["untraceable", "module_lists", "kwargs_dataclass"])
def test_an_export_the_eager_run_rules_out_is_not_attempted_and_would_fail(name):
    model, inputs = load_sample(name)
    cap = capture(model, inputs)
    assert cap.recording is not None
    why = export_blocker(cap.recording, "")
    assert why is not None and "not attempted" in why
    assert any("not attempted" in o.reason for o in cap.opaque if o.module_path == "")
    assert _export_fails(model.eval(), inputs)  # the prediction is right: export fails there


def test_a_branch_on_a_literal_tensor_does_not_rule_export_out():
    class Literal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[1] == 3 and torch.tensor(2) > 1:  # fx cannot read it, export can
                x = x * 2
            return self.bn(self.conv(x))

    model, x = Literal().eval(), torch.randn(2, 3, 8, 8)
    cap = capture(model, x)
    assert cap.how == "torch.export" and not _export_fails(model, (x,))


def test_a_branch_inside_one_part_rules_out_that_part_only():
    model, inputs = load_sample("untraceable")
    cap = capture(model, inputs)
    rec = cap.recording
    assert rec is not None and rec.value_branches == {"gate"}  # `if x.mean() > 0` in Gated
    assert export_blocker(rec, "gate") and export_blocker(rec, "")  # the part, and the whole
    assert export_blocker(rec, "head") is None and export_blocker(rec, "stem") is None
    args, _kwargs = rec.inputs.get("gate", ((torch.randn(2, 8, 16, 16),), {}))
    assert _export_fails(model.gate.eval(), args)
