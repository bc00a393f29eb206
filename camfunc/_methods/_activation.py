"""Maps from activation statistics alone: FEM."""

from __future__ import annotations

from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.split import Split
from camfunc._methods._combine import Computed, activation_cam, spatial_axes, weighted_sum
from camfunc._methods._method import cam_method


def fem_weights(a: Tensor, k: float) -> Tensor:
    r""":math:`w_c = \frac{1}{Z}\sum_{ij} [A_c(i,j) > \mu_c + k\sigma_c]` (population std)."""
    axes = spatial_axes(a)
    threshold = a.mean(axes, keepdim=True) + k * a.std(axes, correction=0, keepdim=True)
    return (a > threshold).to(a.dtype).mean(axes)


@cam_method()
def fem(split: Split, x: Tensor, cls: _targets.Target = 0, *, k: float = 2.0,
        normalize: bool = True, eigen_smooth: bool = False) -> Computed:
    r"""FEM: channels weighted by how often they fire far above their own mean.

    .. math:: w_c = \frac{1}{Z}\sum_{i,j} \big[A_c(i,j) > \mu_c + k\,\sigma_c\big],
              \quad L = \mathrm{ReLU}\Big(\sum_c w_c A_c\Big)

    with :math:`\mu_c, \sigma_c` the channel's mean and (population) standard
    deviation over positions. Class-agnostic and gradient-free, as
    pytorch-grad-cam's ``FEM`` (k = 2); repeated along the class axis ``cls`` asks for.

    Fuad et al., "Features understanding in 3D CNNs for actions recognition in
    video", IPTA 2020.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.fem(s, x).shape
        torch.Size([2, 4, 4])
        >>> camfunc.fem(s, x, k=1.0).shape                # a lower firing threshold
        torch.Size([2, 4, 4])
    """
    return activation_cam(split, x, cls, lambda a: weighted_sum(a, fem_weights(a, k), eigen_smooth),
                          normalize=normalize)
