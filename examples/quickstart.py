"""camfunc in one screen: explain a tiny "bright square" detector with every registered method.

The model is built by hand so that its answer is known without training:
a 3x3 averaging conv responds to bright pixels, global pooling and a linear
layer turn that into two logits, "bright" (0) and "dark" (1). Every gradient
CAM for class 0 should light up where the square is. Needs only torch.

    python examples/quickstart.py
"""

import torch
from torch import nn

import camfunc


def bright_square_detector() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1, 2),
    )
    with torch.no_grad():
        model[0].weight.fill_(1 / 9)
        model[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[4].bias.zero_()
    return model.eval()


def scene(top: int, left: int, size: int = 12) -> torch.Tensor:
    image = 0.1 * torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(top * size + left))
    image[..., top:top + 3, left:left + 3] = 1.0
    return image


def ascii_map(cam: torch.Tensor) -> str:
    shades = " .:-=+*#%@"
    return "\n".join("".join(shades[min(int(v * len(shades)), len(shades) - 1)] * 2 for v in row)
                     for row in cam.tolist())


def main() -> None:
    model = bright_square_detector()
    x = torch.cat([scene(2, 3), scene(7, 8)])      # two images, squares in different places
    s = camfunc.split(model, "1")                  # cut after the ReLU: A is (B, 1, 12, 12)
    camfunc.check(s, model, x)                     # tail(head(x)) == model(x)

    for name, method in camfunc.METHODS.items():
        cams, scores = method(s, x, 0, return_scores=True)   # (B, 12, 12), in [0, 1]
        peaks = [divmod(int(c.argmax()), c.shape[1]) for c in cams]
        print(f"{name:18s} map {tuple(cams.shape)}  peak at {peaks}")

    print("\nGrad-CAM of image 0 (square at rows 2-4, columns 3-5):")
    print(ascii_map(camfunc.gradcam(s, x, 0)[0]))
    both = camfunc.gradcam(s, x, torch.tensor([[0, 1], [0, 1]]))   # two classes, one pass
    print(f"\n(B, K) classes in one call: {tuple(both.shape)}")


if __name__ == "__main__":
    main()
