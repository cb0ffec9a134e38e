"""Round trips through every output format, atomic writes, graph pictures."""

from __future__ import annotations

import importlib.util
import json
import sys

import networkx as nx
import pytest
import torch

from bnrewrite import fold
from bnrewrite.errors import BnrewriteError
from bnrewrite.export import export
from bnrewrite.graph_files import diff_view, graph_view, to_dot
from bnrewrite.load import load
from tests.conftest import load_sample


def test_pt2_in_fold_pt2_out_same_outputs(tmp_path):
    model, inputs = load_sample("resnet")
    src = tmp_path / "in.pt2"
    torch.export.save(torch.export.export(model, inputs), src)
    loaded = load(src)
    folded, report = fold(loaded.model)
    assert len(report.actions) == 15
    out = tmp_path / "out.pt2"
    export(folded, out, loaded.example_inputs)
    again = load(out).model.module()
    torch.testing.assert_close(again(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    targets = {str(n.target) for n in again.graph.nodes}
    assert not any("batch_norm" in t for t in targets)


def test_dynamic_batch(tmp_path):
    model, inputs = load_sample("mlp")
    out = tmp_path / "dyn.pt2"
    export(fold(model, inputs).model, out, inputs, dynamic_batch=True)
    prog = load(out).model.module()
    x = torch.randn(7, 32)
    torch.testing.assert_close(prog(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="onnx extra not installed")
def test_onnx_export_is_checked_by_onnxruntime(tmp_path):
    model, inputs = load_sample("mobilenet")
    info = export(fold(model, inputs).model, tmp_path / "m.onnx", inputs)
    if importlib.util.find_spec("onnxruntime") is not None:
        assert info["onnxruntime_check"]["passed"] is True


def test_python_source_round_trip(tmp_path):
    model, inputs = load_sample("unet3d")
    folded, _ = fold(model, inputs)
    info = export(folded, tmp_path / "unet_folded.py", inputs)
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("unet_folded")
        rebuilt = mod.build()
    finally:
        sys.path.remove(str(tmp_path))
    torch.testing.assert_close(rebuilt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    assert info["weights"].endswith("unet_folded_weights.pt")


def test_graph_formats(tmp_path):
    model, _inputs = load_sample("resnet")
    export(model, tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert any(n.get("module_type") == "BatchNorm2d" for n in data["nodes"])
    export(model, tmp_path / "g.graphml")
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_nodes() == len(data["nodes"])
    export(model, tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


def test_before_after_picture_marks_removed_bn():
    model, inputs = load_sample("resnet")
    folded, report = fold(model, inputs)
    targets = [a.target for a in report.actions]
    union, status, edges = diff_view(graph_view(model), graph_view(folded), targets)
    removed = {n for n, s in status.items() if s == "removed"}
    assert "layers_0_bn1" in removed and len(removed) == 15
    assert status["layers_0_conv1"] == "changed"
    assert edges[("layers_0_conv1", "layers_0_bn1")] == "removed"
    assert edges[("layers_0_conv1", "layers_0_relu")] == "added"
    assert "#cc0000" in to_dot(union, status=status, edge_status=edges)


def test_existing_output_needs_force_and_failure_leaves_nothing(tmp_path):
    model, inputs = load_sample("mlp")
    out = tmp_path / "m.pt2"
    out.write_text("keep me")
    with pytest.raises(BnrewriteError, match="--force"):
        export(model, out, inputs)
    assert out.read_text() == "keep me"
    bad = tmp_path / "x.pt2"
    with pytest.raises(BnrewriteError):
        export(model, bad, (torch.randn(2, 5),))  # wrong input shape: export fails
    assert list(tmp_path.iterdir()) == [out]
