"""Container views (``self.model[:-1]``, ``self.blocks[1:]``, ``self.layers[::2]``) in module
paths map back to the same modules in the user's tree."""

from __future__ import annotations

import torch
from torch import fx, nn

from bnrewrite.capture.views import map_views, user_path


def _tree() -> nn.Module:
    root = nn.Module()
    root.model = nn.Sequential(*[nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)) for _ in range(4)])
    root.blocks = nn.ModuleList([nn.BatchNorm2d(2) for _ in range(5)])
    return root


def test_slices_of_a_sequential_keep_their_keys():
    root = _tree()
    assert user_path("model.slice(None, -1, None).2.1", root) == "model.2.1"
    assert user_path("model.slice(1, None, None).1.0", root) == "model.1.0"
    assert root.get_submodule(user_path("model.slice(None, -1, None).0.1", root)) is root.model[0][1]


def test_slices_and_steps_of_a_module_list_are_renumbered():
    root = _tree()
    assert user_path("blocks.slice(1, None, None).0", root) == "blocks.1"
    assert user_path("blocks.slice(None, None, 2).2", root) == "blocks.4"
    assert user_path("blocks.slice(-2, None, None).1", root) == "blocks.4"


def test_a_called_view_is_its_container_and_an_unknown_path_is_left_alone():
    root = _tree()
    assert user_path("model.slice(None, -1, None)", root) == "model"
    assert user_path("blocks.slice(0, 2, None).7", root) == "blocks.slice(0, 2, None).7"
    assert user_path("model.3.1", root) == "model.3.1"


def test_map_views_rewrites_module_stacks_and_keeps_repeat_marks():
    root = _tree()
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.relu, (x,))
    node.meta["nn_module_stack"] = {
        "a": ("model.slice(None, -1, None)", nn.Sequential),
        "b": ("model.slice(None, -1, None).1.1@1", nn.BatchNorm2d),
    }
    graph.output(node)
    gm = fx.GraphModule(root, graph)
    map_views(gm, root)
    assert [v[0] for v in node.meta["nn_module_stack"].values()] == ["model", "model.1.1@1"]
