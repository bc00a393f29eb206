"""A model for the distributed failure test: it breaks on rank 1 once the real work starts."""

import os

import torch
from torch import nn

from helpers import small_cnn


def check_rank(x):
    """Raises on rank 1 for batches of more than one image; a leaf for torch.fx."""
    if os.environ.get("RANK") == "1" and x.shape[0] > 1:
        raise RuntimeError("rank 1 broke on purpose")
    return x


torch.fx.wrap("check_rank")


class BreaksOnRankOne(nn.Module):
    """``small_cnn`` that raises on rank 1 for batches of more than one image (the set-up
    probes use one image, so every rank gets through them and into the shard loop)."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        return self.net(check_rank(x))


def model() -> nn.Module:
    torch.manual_seed(0)
    return BreaksOnRankOne().eval()
