"""Small sample models people recognize; each module has ``build()`` and ``example_inputs()``.

Use them from the CLI as ``samples.resnet:build`` (run from the repository root).
"""

NAMES = [
    "resnet",
    "mobilenet",
    "unet3d",
    "mlp",
    "functional_bn",
    "bn_after_act",
    "untraceable",
    "shared_conv",
    "module_lists",
    "iterating_parent",
    "kwargs_dataclass",
    "same_padding",
    "decoder",
    "bn_act",
    "inplace_abn",
    "list_blocks",
    "enet",
    "frozen_bn",
    "affine_layers",
    "repvgg",
    "acnet",
    "dbb",
    "mobileone",
    "repconv",
    "repmixer",
]
