"""The names the docstring examples use; tests/test_doctests.py runs this before each one.

A small CNN with resnet's layer names (``layer1`` .. ``layer4``, ``avgpool``,
``fc``), a tiny torchvision ViT, and a batch of two 64x64 images: random
weights, so the examples show shapes, not values.
"""

from collections import OrderedDict

import torch
import torchvision
from torch import nn

import camfunc

torch.manual_seed(0)


def stage(channels_in: int, channels_out: int) -> nn.Sequential:
    """conv (stride 2) -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1),
                         nn.BatchNorm2d(channels_out), nn.ReLU())


model = nn.Sequential(OrderedDict(
    layer1=stage(3, 8), layer2=stage(8, 8), layer3=stage(8, 16), layer4=stage(16, 16),
    avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 10),
)).eval()                                  # 10 classes; layer4: (B, 16, 4, 4) for 64x64 inputs
x = torch.randn(2, 3, 64, 64)              # a batch of B = 2 preprocessed images
s = camfunc.split(model, "layer4")         # head: x -> A, tail: A -> scores
image = torch.rand(3, 64, 64)              # an RGB image in [0, 1], to draw maps on

vit = torchvision.models.VisionTransformer(
    image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
    num_classes=10).eval()                 # 4x4 patches and a class token
nn.init.normal_(vit.heads.head.weight)     # torchvision zero-initialises it
