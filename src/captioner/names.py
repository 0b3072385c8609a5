"""The names that options and config.json accept, in a module that does not import torch.

`captioner --help`, `--version`, `search` and argument errors must answer at once, and importing
torch takes seconds, so the command line takes its choices from here. Each tuple is the keys of a
registry that lives with its code; tests/test_structure.py checks that the two agree.
"""

# model/encoder.BACKBONES
ENCODERS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
            "resnet50", "resnet101", "resnet152", "densenet121")
# model/network.DECODERS
DECODERS = ("show_tell", "attention")
# model/encoder.build_head: the image projection of show_tell
HEADS = ("linear_bn", "mlp")
# runtime.resolve_precision: the autocast precision
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
