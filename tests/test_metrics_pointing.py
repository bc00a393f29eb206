"""Pointing game and energy-based pointing game: hand-computed cases, tolerance edges, boxes = masks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from camfunc import metrics


def peak_at(row: int, column: int, size=(40, 40)) -> torch.Tensor:
    """A (1, H, W) map, 0 everywhere but 1 at one pixel."""
    m = torch.zeros(1, *size)
    m[0, row, column] = 1.0
    return m


def pixel_mask(row: int, column: int, size=(40, 40)) -> torch.Tensor:
    mask = torch.zeros(1, *size, dtype=torch.bool)
    mask[0, row, column] = True
    return mask


@pytest.mark.parametrize("row, column, hit", [
    (10, 24, True),    # 14 px to the right
    (10, 26, False),   # 16 px
    (10, 25, False),   # exactly 15 px: the tolerance is strict, as in TorchRay
    (18, 22, True),    # (8, 12): sqrt(208) = 14.4 px
    (19, 22, False),   # (9, 12): 15 px
    (10, 10, True),    # on the pixel
])
def test_tolerance_around_a_pixel(row, column, hit):
    result = metrics.pointing_game(peak_at(row, column), pixel_mask(10, 10))
    assert result.hits.tolist() == [hit]
    assert result.points.tolist() == [[row, column]]
    assert result.distances.item() == pytest.approx(((row - 10) ** 2 + (column - 10) ** 2) ** 0.5)


@pytest.mark.parametrize("column, hit", [(43, True), (44, False), (45, False), (29, True), (0, False)])
def test_tolerance_around_a_box(column, hit):
    # The box covers columns 20..29 and rows 20..29; the nearest pixel is column 29.
    result = metrics.pointing_game(peak_at(25, column, (40, 50)), torch.tensor([[20, 20, 30, 30]]),
                                   size=(40, 50))
    assert result.hits.tolist() == [hit]
    assert result.distances.item() == pytest.approx(max(column - 29, 0) if column > 20 else 20 - column)


def test_custom_tolerance():
    assert metrics.pointing_game(peak_at(10, 24), pixel_mask(10, 10), tolerance=5).hits.tolist() == [False]
    assert metrics.pointing_game(peak_at(10, 14), pixel_mask(10, 10), tolerance=5).hits.tolist() == [True]


def test_ties_take_the_first_maximum_in_row_major_order():
    maps = torch.zeros(1, 40, 40)
    maps[0, 3, 1] = maps[0, 0, 30] = 1.0  # (0, 30) comes first
    result = metrics.pointing_game(maps, pixel_mask(3, 1), tolerance=1)
    assert result.points.tolist() == [[0, 30]]
    assert result.hits.tolist() == [False]
    assert metrics.pointing_game(maps, pixel_mask(0, 30), tolerance=1).hits.tolist() == [True]


def test_maps_are_upsampled_to_the_ground_truth():
    # A 2x2 map with its peak top right, bilinear to 8x8: columns 6-7 of rows 0-1
    # clamp to the peak's value; the first of them is (0, 6).
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 7, 0] = True
    for m in (maps, maps.unsqueeze(1)):
        result = metrics.pointing_game(m, mask, tolerance=1)
        assert result.points.tolist() == [[0, 6]]
        assert result.distances.item() == pytest.approx((7 ** 2 + 6 ** 2) ** 0.5)


def test_batch_and_several_boxes():
    maps = torch.cat([peak_at(5, 5), peak_at(35, 35), peak_at(20, 5)])
    boxes = [[[0, 0, 10, 10]], torch.tensor([[0, 0, 5, 5], [30, 30, 40, 40]]), [20, 30, 30, 40]]
    result = metrics.pointing_game(maps, boxes, size=(40, 40), tolerance=1)
    assert result.hits.tolist() == [True, True, False]
    assert result.accuracy.item() == pytest.approx(2 / 3)


def test_energy_hand_computed():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]]] * 2)
    result = metrics.energy_pointing_game(maps, masks)
    assert result.proportions.tolist() == [pytest.approx(0.3), 0.0]  # (1 + 2) / 10; no energy
    assert result.mean.item() == pytest.approx(0.15)
    # Boxes in pixels of a 4x4 image: the map is upsampled, the top half is the box.
    upsampled = torch.nn.functional.interpolate(maps[:1, None], size=(4, 4), mode="bilinear",
                                                align_corners=False)[0, 0]
    expected = upsampled[:2].sum() / upsampled.sum()
    result = metrics.energy_pointing_game(maps[:1], torch.tensor([[0, 0, 4, 2]]), size=(4, 4))
    assert result.proportions.item() == pytest.approx(expected.item())


def test_scale_does_not_matter_for_energy():
    maps = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 3, 3], [1, 2, 6, 6], [2, 2, 4, 5]])
    a = metrics.energy_pointing_game(maps, boxes, size=(12, 12)).proportions
    b = metrics.energy_pointing_game(7.5 * maps, boxes, size=(12, 12)).proportions
    torch.testing.assert_close(a, b)


@st.composite
def boxes_and_maps(draw):
    height, width = draw(st.integers(2, 20)), draw(st.integers(2, 20))
    batch = draw(st.integers(1, 3))
    boxes = []
    for _ in range(batch):
        image = []
        for _ in range(draw(st.integers(1, 3))):
            x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
            x2, y2 = draw(st.integers(x1 + 1, width)), draw(st.integers(y1 + 1, height))
            image.append([x1, y1, x2, y2])  # at least one pixel, inside the image
        boxes.append(image)
    seed = draw(st.integers(0, 2**16))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    maps = torch.rand(batch, h, w, generator=torch.Generator().manual_seed(seed))
    return maps, boxes, (height, width)


@given(boxes_and_maps())
def test_boxes_equal_their_masks(case):
    maps, boxes, size = case
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for i, image in enumerate(boxes):
        for x1, y1, x2, y2 in image:
            masks[i, y1:y2, x1:x2] = True
    for tolerance in (1, 3, 15):
        with_boxes = metrics.pointing_game(maps, boxes, size=size, tolerance=tolerance)
        with_masks = metrics.pointing_game(maps, masks, tolerance=tolerance)
        assert torch.equal(with_boxes.hits, with_masks.hits)
        assert torch.equal(with_boxes.distances, with_masks.distances)
    energy_boxes = metrics.energy_pointing_game(maps, boxes, size=size)
    energy_masks = metrics.energy_pointing_game(maps, masks)
    assert torch.equal(energy_boxes.proportions, energy_masks.proportions)
    if all(len(image) == 1 for image in boxes):  # one box per image as a (B, 4) tensor
        tensor_boxes = torch.tensor([image[0] for image in boxes])
        assert torch.equal(metrics.pointing_game(maps, tensor_boxes, size=size).hits,
                           metrics.pointing_game(maps, masks).hits)


@given(boxes_and_maps())
def test_a_point_inside_always_hits_and_energy_is_a_fraction(case):
    maps, boxes, size = case
    result = metrics.pointing_game(maps, boxes, size=size, tolerance=0.5)
    assert torch.equal(result.hits, result.distances == 0)
    energy = metrics.energy_pointing_game(maps, boxes, size=size).proportions
    assert ((energy >= 0) & (energy <= 1 + 1e-6)).all()


@pytest.mark.parametrize("maps, target, kwargs, error, message", [
    (torch.rand(2, 4, 4), torch.tensor([[0, 0, 2, 2]] * 2), {}, ValueError, r"give size=\(H, W\)"),
    (torch.rand(2, 4, 4), torch.zeros(2, 8, 8, dtype=torch.bool), {}, ValueError, r"images \[0, 1\] have no"),
    (torch.rand(2, 4, 4), torch.ones(2, 8, 8), {}, ValueError, r"mask\.bool\(\)"),
    (torch.rand(2, 4, 4), torch.ones(3, 8, 8, dtype=torch.bool), {}, ValueError, r"B = 2"),
    (torch.rand(2, 4, 4), torch.ones(2, 8, 8, dtype=torch.bool), {"size": (4, 4)}, ValueError, r"leave size out"),
    (torch.rand(2, 4, 4), [[0, 0, 2, 2]], {"size": (8, 8)}, ValueError, r"1 images but the batch has 2"),
    (torch.rand(2, 4, 4), [[0, 0, 2, 2], [3, 3, 1, 1]], {"size": (8, 8)}, ValueError, r"x2 < x1"),
    (torch.rand(2, 4, 4), [[0, 0, 2], [0, 0, 1, 1]], {"size": (8, 8)}, ValueError, r"image 0's boxes"),
    (torch.rand(2, 4, 4), [[20, 20, 30, 30], [0, 0, 1, 1]], {"size": (8, 8)}, ValueError, r"images \[0\]"),
    (torch.rand(2, 4, 4), "boxes", {"size": (8, 8)}, TypeError, r"ground truth must be"),
    (torch.rand(2, 2, 4, 4), torch.ones(2, 8, 8, dtype=torch.bool), {}, ValueError, r"2 maps per image"),
    (torch.rand(2, 4), torch.ones(2, 8, 8, dtype=torch.bool), {}, ValueError, r"2 spatial axes"),
    (torch.full((2, 4, 4), float("nan")), torch.ones(2, 8, 8, dtype=torch.bool), {}, ValueError, r"NaN"),
])
def test_bad_input(maps, target, kwargs, error, message):
    for fn in (metrics.pointing_game, metrics.energy_pointing_game):
        with pytest.raises(error, match=message):
            fn(maps, target, **kwargs)


def test_bad_tolerance_and_negative_energy():
    masks = torch.ones(1, 4, 4, dtype=torch.bool)
    for tolerance in (0, -1, float("nan"), "15", True):
        with pytest.raises(ValueError, match=r"tolerance must be a positive number"):
            metrics.pointing_game(torch.rand(1, 4, 4), masks, tolerance=tolerance)
    with pytest.raises(ValueError, match=r"non-negative maps"):
        metrics.energy_pointing_game(torch.randn(1, 4, 4) - 5, masks)


def test_inputs_are_not_changed():
    maps = torch.rand(2, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 8.0, 8.0]])
    copies = maps.clone(), boxes.clone()
    metrics.pointing_game(maps, boxes, size=(8, 8))
    metrics.energy_pointing_game(maps, boxes, size=(8, 8))
    assert torch.equal(maps, copies[0]) and torch.equal(boxes, copies[1])


def test_fractional_boxes_cover_the_pixels_whose_centres_they_contain():
    maps = torch.ones(1, 4, 4)  # energy = share of pixels covered
    covered = metrics.energy_pointing_game(maps, [[[0.5, 0.5, 1.5, 1.5]]], size=(4, 4))
    assert covered.proportions.item() == pytest.approx(4 / 16)  # centres 0.5 and 1.5, edges included
    covered = metrics.energy_pointing_game(maps, [[[0.6, 0.0, 1.6, 4.0]]], size=(4, 4))
    assert covered.proportions.item() == pytest.approx(4 / 16)  # only column 1's centre, 1.5


def test_chance_rate_by_hand_and_against_random_points():
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 0, 0] = True          # tolerance 2 (strict): offsets with dy^2+dx^2 < 4 in the image
    masks[1, 4:6, 4:6] = True      # tolerance 1: only the 4 pixels themselves
    chance_two = metrics.pointing_game_chance(masks[:1], tolerance=2)
    # (0,0),(0,1),(1,0),(1,1) are within distance < 2 of the corner pixel: 4 of 100.
    assert chance_two.tolist() == pytest.approx([0.04])
    assert metrics.pointing_game_chance(masks[1:], tolerance=1).tolist() == pytest.approx([0.04])
    # Equal to the pointing game's hit rate over every possible point (a one-hot map per pixel).
    for tolerance in (1.5, 3, 15):
        points = torch.eye(100).reshape(100, 10, 10)
        for i in range(2):
            hits = metrics.pointing_game(points, masks[i:i + 1].expand(100, 10, 10),
                                                 tolerance=tolerance).hits
            chance = metrics.pointing_game_chance(masks[i:i + 1], tolerance=tolerance)
            assert chance.item() == pytest.approx(hits.float().mean().item())


@st.composite
def boxes_on_a_grid(draw):
    """A map with one drawn peak, one box drawn in half-pixel steps (so box edges fall on
    pixel centres), and a tolerance at or next to a pixel distance."""
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    row, column = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    x1, x2 = sorted(draw(st.integers(0, 2 * width)) / 2 for _ in range(2))
    y1, y2 = sorted(draw(st.integers(0, 2 * height)) / 2 for _ in range(2))
    # Square roots of integers land on pixel distances; a step of one ulp either side
    # tests the strict comparison itself.
    root = draw(st.integers(1, 60)) ** 0.5
    tolerance = draw(st.sampled_from([root, math.nextafter(root, 0), math.nextafter(root, math.inf)]))
    return (height, width), (row, column), (x1, y1, x2, y2), tolerance


@given(case=boxes_on_a_grid())
@example(case=((1, 5), (0, 0), (3.0, 0.0, 4.0, 1.0), 3.0))  # exactly 3 px away: a miss
@example(case=((4, 4), (0, 0), (2.5, 2.5, 2.5, 2.5), 8 ** 0.5))  # sqrt(8) rounds up: a hit
def test_pointing_game_boundary_against_a_loop_over_pixels(case):
    """The docstring's rule, written out: pixel (i, j) is inside when its centre
    (j + 0.5, i + 0.5) lies in the box, edges included; a hit when some inside pixel is at
    Euclidean distance strictly below the tolerance, compared exactly in rationals."""
    (height, width), (row, column), (x1, y1, x2, y2), tolerance = case
    inside = [(i, j) for i in range(height) for j in range(width)
              if x1 <= j + 0.5 <= x2 and y1 <= i + 0.5 <= y2]
    if not inside:  # no ground truth to point at: refused, not scored as a miss
        with pytest.raises(ValueError, match="no ground-truth pixel"):
            metrics.pointing_game(peak_at(row, column, (height, width)), [[[x1, y1, x2, y2]]],
                                  size=(height, width), tolerance=tolerance)
        return
    squared_tolerance = Fraction(tolerance) ** 2  # the float given, not the root it rounds
    hit = any((i - row) ** 2 + (j - column) ** 2 < squared_tolerance for i, j in inside)
    result = metrics.pointing_game(peak_at(row, column, (height, width)), [[[x1, y1, x2, y2]]],
                                   size=(height, width), tolerance=tolerance)
    assert result.hits.tolist() == [hit]
    assert result.points.tolist() == [[row, column]]
    nearest = min(((i - row) ** 2 + (j - column) ** 2) ** 0.5 for i, j in inside)
    assert result.distances.item() == pytest.approx(nearest)
    energy = metrics.energy_pointing_game(torch.ones(1, height, width), [[[x1, y1, x2, y2]]],
                                          size=(height, width))
    assert energy.proportions.item() == pytest.approx(len(inside) / (height * width))
