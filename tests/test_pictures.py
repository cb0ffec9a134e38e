"""Pictures: ``--graph`` draws an SVG without Graphviz, ``--plot`` draws the per-channel ranges;
every CLI line is text."""

from __future__ import annotations

import builtins
import xml.dom.minidom

import pytest
from typer.testing import CliRunner

from bnrewrite import fold
from bnrewrite import graph_files as gf
from bnrewrite.cli import app
from tests.conftest import load_sample

runner = CliRunner()


def test_graph_svg_is_drawn_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(gf.shutil, "which", lambda _name: None)  # no `dot` on this machine
    svg = tmp_path / "diff.svg"
    res = runner.invoke(
        app, ["fold", "samples.resnet:build", "-o", str(tmp_path / "r.pt"), "--graph", str(svg)]
    )
    assert res.exit_code == 0, res.output
    graph_line = next(line for line in res.stdout.splitlines() if line.startswith("graph:"))
    assert "{" not in graph_line and "renderer bnrewrite" in graph_line
    doc = xml.dom.minidom.parse(str(svg))
    boxes = doc.getElementsByTagName("rect")
    assert len(boxes) > 30  # one box per node (and the background)
    fills = {b.getAttribute("fill") for b in boxes}
    assert "#f4cccc" in fills and "#fff2cc" in fills  # removed BatchNorms, changed convs
    assert (tmp_path / "diff.dot").exists()


def test_graph_svg_layout_draws_every_node_once():
    from bnrewrite.graph_svg import render

    model, _ = load_sample("shared_conv")
    view = gf.graph_view(model)
    text = render(view, title="t")
    kept = [n for n, a in view.nodes(data=True) if a.get("op") != "get_attr"]
    assert text.count("<g><title>") == len(kept)
    assert text.count("marker-end=") == sum(1 for u, v in view.edges() if u in kept and v in kept)


@pytest.mark.parametrize("suffix", ["svg", "png"])
@pytest.mark.parametrize("command", ["analyze", "fold", "equalize"])
def test_plot_writes_a_picture(tmp_path, command, suffix):
    out = tmp_path / f"ranges.{suffix}"
    args = {
        "analyze": ["analyze", "samples.precision_cases:build", "--fail-on", "never"],
        "fold": ["fold", "samples.precision_cases:build", "--dry-run"],
        "equalize": ["equalize", "samples.mobilenet_v1:build", "--dry-run"],
    }[command]
    res = runner.invoke(app, [*args, "--plot", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data[:2000]
    assert f"plot: {out}" in res.stdout


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "p.png"
    res = runner.invoke(
        app, ["fold", "samples.resnet:build", "-o", str(tmp_path / "x.pt"), "--plot", str(out)]
    )
    assert res.exit_code == 2 and "bnrewrite[plot]" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "x.pt").exists()  # nothing written
    res = runner.invoke(app, ["fold", "samples.resnet:build", "--dry-run", "--plot", str(tmp_path / "p.pdf")])
    assert res.exit_code == 2


def test_report_details_never_reach_json():
    model, inputs = load_sample("precision_cases")
    report = fold(model, inputs).report
    assert report.details["precision"] and "details" not in report.to_dict()
