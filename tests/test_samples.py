"""Every sample: inventory verdicts as documented, folded, verified against float64."""

import pytest

import samples
from bnrewrite import analyze, fold
from bnrewrite.verify import verify
from tests.conftest import assert_unchanged, load_sample, state_snapshot

EXPECTED = {
    "resnet": {"fold-into-preceding": 15},
    "mobilenet": {"fold-into-preceding": 14},
    "unet3d": {"fold-into-preceding": 12},
    "mlp": {"fold-into-preceding": 2},
    "functional_bn": {"fold-into-preceding": 2},
    "bn_after_act": {"fold-into-following": 2, "not-foldable": 2},
    "untraceable": {"fold-into-preceding": 4, "not-foldable": 1},
    "shared_conv": {"fold-into-preceding": 1, "merge-branches": 1},  # a + bn_b(shared(a)): one conv
    "module_lists": {"fold-into-preceding": 5},
    "iterating_parent": {"fold-into-preceding": 4},
    "kwargs_dataclass": {"fold-into-preceding": 3},
    "same_padding": {"fold-into-preceding": 3},
    "decoder": {"fold-into-preceding": 6},  # timing-free here; FD108 is tested on its own
    "bn_act": {"fold-into-preceding": 4},
    "inplace_abn": {"fold-into-preceding": 3},
    "list_blocks": {"fold-into-preceding": 5},
    "enet": {"fold-into-preceding": 3},
    "frozen_bn": {"fold-into-preceding": 3},
    "affine_layers": {"fold-into-preceding": 2, "fold-into-following": 2, "not-foldable": 4},
    "repvgg": {"merge-branches": 15},
    "acnet": {"merge-branches": 9},
    "dbb": {"merge-branches": 22},
    "mobileone": {"merge-branches": 31},
    "repconv": {"fold-into-preceding": 1, "merge-branches": 8},
    "repmixer": {"fold-into-preceding": 3, "merge-branches": 8},
}


def _count(values):
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


@pytest.mark.parametrize("name", samples.NAMES)
def test_sample_verdicts_fold_and_verify(name):
    model, inputs = load_sample(name)
    snap = state_snapshot(model)
    report = analyze(model, inputs)
    assert _count(n.verdict for n in report.norms) == EXPECTED[name]
    assert all(n.reason for n in report.norms)
    folded, fold_report = fold(model, inputs)
    done = _count(a.kind for a in fold_report.actions)
    assert done == {k: v for k, v in EXPECTED[name].items() if k != "not-foldable"}
    result = verify(model, folded, inputs)
    assert result.passed, result.summary()
    assert_unchanged(model, snap)


def test_bn_after_activation_reasons():
    model, inputs = load_sample("bn_after_act")
    by_path = {n.module_path: n for n in analyze(model, inputs).norms}
    assert by_path["post_unpadded.bn"].target == "post_unpadded.conv2"
    assert by_path["post_zero_pad.bn"].reason_code == "FD201"
    assert by_path["preact.bn"].verdict == "not-foldable" and by_path["preact.bn"].reason_code == "BN009"


def test_untraceable_reports_the_opaque_part_with_reason():
    model, inputs = load_sample("untraceable")
    report = analyze(model, inputs)
    post = next(n for n in report.norms if n.module_path == "post_bn")
    assert post.reason_code == "FD203" and "TraceError" in post.reason
    assert {o.module_path for o in report.opaque} == {"", "gate"}


def test_shared_conv_folds_each_call_site_separately():
    model, inputs = load_sample("shared_conv")
    _folded, report = fold(model, inputs, merge_branches=False)
    assert sorted(a.target for a in report.actions) == ["shared", "shared_folded1"]
