"""ShapesNet: the small CNN that ships with camfunc, and its loader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from camfunc.zoo._scenes import CLASSES

WEIGHTS_FILE = Path(__file__).with_name("shapesnet.pt")
LAYER = "block3"  # the last spatial layer: 16x16 maps for 64x64 scenes


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ShapesNet(nn.Module):
    """Four conv stages, global average pooling and a linear classifier.

    Input (B, 3, 64, 64) in [0, 1]; ``block3`` gives (B, 64, 16, 16).
    """

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv(3, 16))
        self.block1 = nn.Sequential(*_conv(16, 32, stride=2))
        self.block2 = nn.Sequential(*_conv(32, 64, stride=2), *_conv(64, 64))
        self.block3 = nn.Sequential(*_conv(64, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        scores: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return scores


def shapesnet(*, pretrained: bool = True, weights: str | Path | None = None) -> ShapesNet:
    """The embedded model, in eval mode, with its shipped weights (or ``weights``, or random).

    Weights load with ``torch.load(weights_only=True)``: a plain state dict.
    Its layer for CAMs is ``camfunc.zoo.LAYER`` (``"block3"``). No paper: a plain
    conv/batch-norm/ReLU stack with global average pooling and a linear head, the
    architecture CAM itself assumes (Zhou et al., CVPR 2016), trained by
    ``python -m camfunc.zoo.train``.

    Example:
        >>> model = camfunc.zoo.shapesnet()
        >>> data = camfunc.zoo.scenes(4, seed=1)
        >>> camfunc.gradcam(camfunc.split(model, camfunc.zoo.LAYER), data.images, data.labels).shape
        torch.Size([4, 16, 16])
    """
    model = ShapesNet()
    path = Path(weights) if weights is not None else (WEIGHTS_FILE if pretrained else None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
