"""Loading: every supported input, and a fuzz-style suite of bad input."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from bnrewrite.checkpoint import read_state_dict
from bnrewrite.errors import BnrewriteError, UsageError
from bnrewrite.load import load, parse_shapes
from tests.conftest import load_sample


def test_factory_spec_with_example_inputs():
    loaded = load("samples.resnet:build")
    assert loaded.kind == "factory" and loaded.example_inputs[0].shape == (2, 3, 32, 32)


def test_pt2_keeps_its_example_inputs(tmp_path):
    model, inputs = load_sample("mlp")
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, inputs), path)
    loaded = load(path)
    assert loaded.kind == "pt2" and loaded.example_inputs[0].shape == inputs[0].shape


@pytest.mark.parametrize("layout", ["plain", "checkpoint", "dataparallel", "safetensors"])
def test_weights_in_every_common_layout(tmp_path, layout):
    model, _ = load_sample("mlp")
    sd = model.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif layout == "checkpoint":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif layout == "dataparallel":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    loaded = load("samples.mlp:build", weights=path)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])


class Marker:
    """Unpickling this would create a marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_files(tmp_path):
    marker = tmp_path / "PWNED"
    files = {}
    files["empty.pt2"] = b""
    files["garbage.pt2"] = os.urandom(256)
    model, inputs = load_sample("mlp")
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, inputs), good)
    files["truncated.pt2"] = good.read_bytes()[:500]
    files["wrong_ext.onnx"] = good.read_bytes()[:100]
    zpath = tmp_path / "zip.pt2"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("hello.txt", "hi")
    files["wrong_members.pt2"] = zpath.read_bytes()
    payload = tmp_path / "payload.pt"
    with open(payload, "wb") as f:
        pickle.dump(Marker(str(marker)), f)
    files["payload.pt"] = payload.read_bytes()
    return files, marker


def test_bad_model_files_fail_cleanly_and_run_no_code(tmp_path):
    files, marker = _bad_files(tmp_path)
    for name, data in files.items():
        path = tmp_path / f"in_{name}"
        path.write_bytes(data)
        before = path.read_bytes()
        with pytest.raises(BnrewriteError) as info:
            load(path)
        assert "\n" not in str(info.value), name
        assert path.read_bytes() == before
    assert not marker.exists()


def test_pickled_module_refused_unless_trusted(tmp_path):
    model, _ = load_sample("mlp")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(BnrewriteError, match="--trust-pickle"):
        load(path)
    assert load(path, trust_pickle=True).kind == "pickle"


def test_torchscript_is_recognized(tmp_path):
    model, inputs = load_sample("mlp")
    path = tmp_path / "ts.pt"
    torch.jit.trace(model, inputs).save(str(path))
    with pytest.raises(BnrewriteError, match="TorchScript"):
        load(path)


def test_state_dict_given_as_model_says_what_to_do(tmp_path):
    model, _ = load_sample("mlp")
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(BnrewriteError, match="--weights"):
        load(path)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuchpkg.mod:build", "cannot import"),
        ("samples.resnet:nothere", "no attribute"),
        ("samples.resnet:ResNet.forward", "raised"),
        ("tests.test_load:_raises", "raised RuntimeError"),
        ("missing_file.pt2", "no such file"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(BnrewriteError, match=match):
        load(spec)


def _raises():
    raise RuntimeError("boom")


def test_wrong_weights_list_keys_and_shapes(tmp_path):
    model, _ = load_sample("mlp")
    sd = model.state_dict()
    sd.pop("net.0.bias")
    sd["extra"] = torch.zeros(1)
    sd["net.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(BnrewriteError) as info:
        load("samples.mlp:build", weights=path)
    msg = str(info.value)
    assert "missing: net.0.bias" in msg and "unexpected: extra" in msg and "net.0.weight (3, 3)" in msg


def test_weights_with_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "evil": Marker(str(marker))}, path)
    with pytest.raises(BnrewriteError, match="refusing"):
        read_state_dict(path)
    assert not marker.exists()


def test_parse_shapes():
    assert parse_shapes(["1,3,8,8", "2x4"]) == [(1, 3, 8, 8), (2, 4)]
    with pytest.raises(UsageError):
        parse_shapes(["1,a"])
    with pytest.raises(UsageError):
        parse_shapes(["0,3"])
