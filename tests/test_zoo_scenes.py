"""The procedural scenes: determinism, exact masks, shape geometry by hand."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from camfunc import zoo
from camfunc.zoo._scenes import SHAPE_REACH, shape_masks


def test_a_seed_names_a_scene_set_exactly():
    a, b = zoo.scenes(6, seed=3), zoo.scenes(6, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = zoo.scenes(6, seed=4)
    assert not torch.equal(a.images, c.images)


@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
@example(31845339, 2)  # a rotated square's corner reached the border when margins counted r only
def test_masks_are_exactly_the_objects_visible_pixels(seed, n):
    data = zoo.scenes(n, seed=seed)
    assert data.images.shape == (n, 3, 64, 64) and data.masks.shape == (n, 64, 64)
    assert data.masks.dtype == torch.bool and data.labels.dtype == torch.long
    assert 0 <= int(data.labels.min()) and int(data.labels.max()) < len(zoo.CLASSES)
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    for image, mask in zip(data.images, data.masks):
        area = int(mask.sum())
        assert area > 40, "every object is visible"
        pixels = image[:, mask]  # (3, area): one flat colour, drawn last
        assert torch.equal(pixels, pixels[:, :1].expand_as(pixels))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # Never touching the border: the object lies wholly inside the image.
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < 63 and xs.max() < 63


@given(angle=st.floats(0, 2 * math.pi))
def test_no_shape_reaches_past_its_margin_and_the_square_reaches_it(angle):
    r = 20.0
    coords = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    u = math.cos(angle) * x + math.sin(angle) * y
    v = -math.sin(angle) * x + math.cos(angle) * y
    masks = shape_masks(u[None], v[None], torch.tensor([r]))[0]
    distance = torch.sqrt(x * x + y * y)
    reach = [float(distance[m].max()) for m in masks]
    assert max(reach) <= SHAPE_REACH * r
    # The square's corner, 0.8 r * sqrt(2), is within a pixel's diagonal of the bound.
    assert reach[zoo.CLASSES.index("square")] > SHAPE_REACH * r - math.sqrt(2)


def test_classes_are_roughly_balanced():
    counts = torch.bincount(zoo.scenes(1000, seed=0).labels, minlength=len(zoo.CLASSES))
    assert counts.min() > 150  # 200 expected each; 150 is > 4 standard deviations below


@pytest.mark.parametrize("name, area_over_r2", [
    ("circle", math.pi),
    ("square", 1.6 ** 2),
    ("triangle", 3 * math.sqrt(3) / 4),  # equilateral with inradius r/2: 3*sqrt(3)*(r/2)^2
    ("cross", 2 * (2 * 0.6) - 0.6 ** 2),  # two 2r x 0.6r arms minus their overlap
    ("ring", math.pi * (1 - 0.55 ** 2)),
])
def test_shape_areas_match_their_geometry(name, area_over_r2):
    r = 40.0
    coords = torch.arange(-60, 60, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    masks = shape_masks(u[None], v[None], torch.tensor([r]))
    area = masks[0, zoo.CLASSES.index(name)].sum().item()
    assert area == pytest.approx(area_over_r2 * r * r, rel=0.02)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3"])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        zoo.scenes(bad)


def test_decoy_scenes_add_only_a_corner_patch_whose_colour_follows_the_class_or_not():
    plain = zoo.scenes(64, seed=5)
    tied = zoo.scenes(64, seed=5, decoy="class")
    loose = zoo.scenes(64, seed=5, decoy="random")
    assert torch.equal(plain.labels, tied.labels) and torch.equal(plain.masks, tied.masks)
    side = 64 // 10
    changed = (plain.images != tied.images).any(1)  # (N, S, S)
    for image, label, where, mask in zip(tied.images, tied.labels, changed, tied.masks):
        ys, xs = where.nonzero(as_tuple=True)
        assert len(ys) > 0 and ys.max() - ys.min() < side and xs.max() - xs.min() < side
        assert ys.min() in (2, 64 - 2 - side) and xs.min() in (2, 64 - 2 - side)  # a corner
        colours = image[:, ys, xs].T.unique(dim=0)
        assert torch.equal(colours, zoo.DECOY_COLOURS[label][None])
        assert not (where & mask).any()  # under the object: its mask stays its visible pixels
    shades = [int((zoo.DECOY_COLOURS == image[:, ys, xs].T[0]).all(1).nonzero())
              for image, (ys, xs) in zip(loose.images,
                                         ((plain.images != loose.images).any(1)[i].nonzero(as_tuple=True)
                                          for i in range(64)))]
    agreement = (torch.tensor(shades) == loose.labels).float().mean()
    assert agreement < 0.5  # drawn independently of the class (expected 0.2)
    with pytest.raises(ValueError, match="decoy must be"):
        zoo.scenes(2, decoy="corner")
