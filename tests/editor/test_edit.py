"""Copy-on-write edits of the user's module tree, including modules registered at several paths."""

from __future__ import annotations

from torch import nn

from bnrewrite.editor.edit import Editor, shallow_copy


class Aliased(nn.Module):
    """A block kept both as ``block`` and inside ``skips`` (MONAI DynUNet style), and one
    BatchNorm registered under two different parents."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
        self.skips = nn.ModuleDict({"down": self.block})
        shared = nn.BatchNorm2d(2)
        self.a = nn.Sequential(shared)
        self.b = nn.Sequential(nn.Identity(), shared)


def _bns(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.BatchNorm2d)]


def test_an_aliased_parent_is_copied_once_and_replaced_everywhere():
    model = Aliased()
    root = shallow_copy(model)
    editor = Editor(root)
    editor.set_module("block.1", nn.Identity())
    assert root.block is root.skips["down"] and root.block is not model.block
    assert "skips.down.1" not in _bns(root) and "block.1" not in _bns(root)
    assert _bns(model) == ["block.1", "skips.down.1", "a.0", "b.1"]  # the input is untouched


def test_a_module_under_two_parents_is_replaced_under_both():
    model = Aliased()
    root = shallow_copy(model)
    Editor(root).set_module("a.0", nn.Identity())
    assert _bns(root) == ["block.1", "skips.down.1"]
    assert isinstance(model.b[1], nn.BatchNorm2d)


def test_inplace_edits_reach_every_path_too():
    model = Aliased()
    Editor(model, inplace=True).set_module("b.1", nn.Identity())
    assert _bns(model) == ["block.1", "skips.down.1"]


class PlainHolders(nn.Module):
    """Registered children also held in a plain list, tuple, dict and attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.BatchNorm2d(2) for _ in range(4))
        self.as_list = [nn.ReLU(), self.a]
        self.as_tuple = (self.b,)
        self.as_dict = {"c": [self.c]}
        object.__setattr__(self, "as_attr", self.d)


def test_plain_containers_and_attributes_follow_the_edit():
    model = PlainHolders()
    root = shallow_copy(model)
    editor = Editor(root)
    for path in ("a", "b", "c", "d"):
        editor.set_module(path, nn.Identity())
    assert type(root.as_list[1]) is nn.Identity and type(root.as_tuple[0]) is nn.Identity
    assert type(root.as_dict["c"][0]) is nn.Identity and type(root.as_attr) is nn.Identity
    assert root.as_list[0] is model.as_list[0]  # untouched items are shared
    assert isinstance(model.as_list[1], nn.BatchNorm2d) and isinstance(model.as_tuple[0], nn.BatchNorm2d)
    assert isinstance(model.as_dict["c"][0], nn.BatchNorm2d) and model.as_attr is model.d


def test_inplace_edits_reach_plain_containers_too():
    model = PlainHolders()
    Editor(model, inplace=True).set_module("b", nn.Identity())
    assert type(model.as_tuple[0]) is nn.Identity and type(model.b) is nn.Identity


def test_a_copy_has_its_own_hooks():
    model = nn.Conv2d(1, 1, 1)
    copy_ = shallow_copy(model)
    copy_.register_forward_hook(lambda *a: None)
    assert not model._forward_hooks
