"""A folded model's state_dict round-trips into the user's factory, strictly."""

from __future__ import annotations

import pytest
import torch

import samples
from bnrewrite import BnrewriteError, export, fold, load
from bnrewrite.structure import describe
from bnrewrite.verify import output_leaves
from tests.conftest import load_sample

GRAPH_ROOT = {"functional_bn", "shared_conv"}  # folds only a graph can express (FD104 at the root)
GRAPH_PARTS = {"inplace_abn"}  # norm modules whose rest of forward is no chain of their children
MERGED = {"repvgg", "acnet", "dbb", "mobileone", "repconv", "repmixer"}  # blocks that became one conv


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", samples.NAMES)
def test_state_dict_round_trip_loads_strictly_and_matches(name, suffix, tmp_path):
    model, inputs = load_sample(name)
    folded, report = fold(model, inputs)
    keys = list(folded.state_dict())
    for a in report.actions:  # no tensor of a folded BatchNorm is left
        assert not any(a.module_path and k.startswith(a.module_path + ".") for k in keys), a.module_path
    path = tmp_path / f"folded{suffix}"
    export(folded, path)
    if name in GRAPH_ROOT | GRAPH_PARTS | MERGED:
        with pytest.raises(BnrewriteError, match="replaced by a graph"):
            load(f"samples.{name}:build", weights=path)
        return
    loaded = load(f"samples.{name}:build", weights=path).model
    assert type(loaded) is type(model)
    assert describe(loaded) == describe(folded)
    with torch.no_grad():
        want, got = output_leaves(folded(*inputs)), output_leaves(loaded(*inputs))
    assert [p for p, _ in want] == [p for p, _ in got]
    for (_, w), (_, g) in zip(want, got):
        assert torch.equal(w, g)


def test_plain_state_dict_of_the_folded_model_does_not_fit_the_class_strictly(tmp_path):
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    path = tmp_path / "plain.pt"
    torch.save(folded.state_dict(), path)  # no structure recorded: the BN keys are missing
    with pytest.raises(BnrewriteError, match="missing"):
        load("samples.resnet:build", weights=path)
