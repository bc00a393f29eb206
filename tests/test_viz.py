"""Overlays and figures: hand-computed blends, every accepted image type, PNG output."""

import io

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import camfunc
from camfunc.viz import figure, overlay


def test_overlay_blends_the_colormap_of_the_bilinear_resized_map_by_hand():
    image = np.zeros((1, 4, 3), dtype=np.uint8)
    image[..., 0] = 200
    cam = torch.tensor([[0.0, 2.0]])  # 1x2 -> 1x4: pixel centres at -0.25, 0.25, 0.75, 1.25 (clamped)
    expected_levels = np.array([0.0, 0.25, 0.75, 1.0])
    heat = matplotlib.colormaps["viridis"](expected_levels)[:, :3]
    expected = np.round((0.7 * (image[0] / 255.0) + 0.3 * heat) * 255).astype(np.uint8)
    got = np.asarray(overlay(image, cam, colormap="viridis", alpha=0.3))
    assert got.shape == (1, 4, 3)
    np.testing.assert_array_equal(got[0], expected)


def test_overlay_of_a_flat_map_is_the_colormaps_lowest_colour():
    image = torch.full((3, 5, 6), 0.5)
    got = np.asarray(overlay(image, torch.ones(2, 2), alpha=1.0))
    low = np.round(np.array(matplotlib.colormaps["jet"](0.0)[:3]) * 255).astype(np.uint8)
    assert (got == low).all()


@pytest.mark.parametrize("kind", ["pil", "uint8_hwc", "uint8_hw", "float_chw", "float_hwc", "rgba"])
def test_every_image_type_gives_the_same_overlay(kind):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    grey = pixels[..., 0]
    images = {
        "pil": Image.fromarray(pixels),
        "uint8_hwc": pixels,
        "uint8_hw": grey,
        "float_chw": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,
        "float_hwc": pixels.astype(np.float64) / 255,
        "rgba": np.concatenate([pixels, np.full((12, 10, 1), 255, np.uint8)], -1),
    }
    reference = pixels if kind != "uint8_hw" else np.repeat(grey[..., None], 3, -1)
    cam = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))
    got = np.asarray(overlay(images[kind], cam, alpha=0.4))
    expected = np.asarray(overlay(reference, cam, alpha=0.4))
    assert got.shape == (12, 10, 3)
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)


@given(st.floats(0, 1), st.integers(1, 9), st.integers(1, 9))
def test_alpha_zero_is_the_image_and_any_alpha_stays_between(alpha, h, w):
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    cam = torch.arange(4.0).reshape(2, 2)
    plain = np.asarray(overlay(image, cam, alpha=0.0))
    np.testing.assert_array_equal(plain, image)
    heat = np.asarray(overlay(image, cam, alpha=1.0)).astype(int)
    mixed = np.asarray(overlay(image, cam, alpha=alpha)).astype(int)
    low = np.minimum(image.astype(int), heat) - 1
    high = np.maximum(image.astype(int), heat) + 1
    assert ((mixed >= low) & (mixed <= high)).all()


def test_overlay_leaves_its_inputs_alone():
    image = torch.rand(3, 8, 8)
    cam = torch.rand(4, 4)
    before = image.clone(), cam.clone()
    overlay(image, cam)
    assert torch.equal(image, before[0]) and torch.equal(cam, before[1])


@pytest.mark.parametrize("image, cam, message", [
    (torch.full((3, 4, 4), 2.0), torch.rand(2, 2), "undo the input normalisation"),
    (np.zeros((4, 4, 5), np.uint8), torch.rand(2, 2), "got shape"),
    ("picture.png", torch.rand(2, 2), "PIL image"),
    (np.zeros((4, 4, 3), np.uint8), torch.rand(2, 2, 2), "one 2-D map"),
])
def test_bad_inputs_say_what_was_expected(image, cam, message):
    with pytest.raises((ValueError, TypeError), match=message):
        overlay(image, cam)


def test_bad_colormap_and_alpha():
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown colormap"):
        overlay(image, torch.rand(2, 2), colormap="nope")
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, torch.rand(2, 2), alpha=1.5)


def test_there_is_one_overlay_in_viz():
    assert camfunc.viz.overlay is overlay
    assert not hasattr(camfunc, "overlay")


def test_figure_has_a_panel_per_method_and_class_and_writes_a_png(tmp_path):
    image = torch.rand(3, 16, 16)
    maps = {"a": torch.rand(2, 4, 4), "b": torch.rand(2, 8, 8)}
    path = tmp_path / "sub" / "fig.png"
    fig = figure(image, maps, classes=["cat", "dog"], path=path, panel_inches=1.0, dpi=50)
    assert len(fig.axes) == 2 * 3 + 1  # and the colour bar
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input: cat", "a", "b"]
    assert fig.axes[-1].get_ylabel() == "relevance, each map\nscaled to [0, 1]"
    with Image.open(path) as png:  # 3 panels of 1 inch and the colour bar's 0.9, at 50 dpi
        assert png.format == "PNG" and png.size == (195, 100)
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary left behind


def test_small_inputs_are_shown_smooth_at_the_display_size():
    image = torch.zeros(3, 8, 16)
    image[:, :, 8:] = 1.0  # a sharp edge: bicubic upsampling keeps it, blurred, in [0, 1]
    fig = figure(image, {"m": torch.rand(2, 4)}, display_size=64, colorbar=False)
    shown = [ax.get_images()[0].get_array() for ax in fig.axes]
    assert [a.shape[:2] for a in shown] == [(32, 64), (32, 64)]
    assert 0.0 <= shown[0].min() and shown[0].max() <= 1.0
    middle = np.asarray(shown[0])[0, :, 0]
    assert 0.0 < middle[31] < 1.0 or 0.0 < middle[32] < 1.0  # no blocky step of 4 pixels
    own = figure(image, {"m": torch.rand(2, 4)}, display_size=None, colorbar=False)
    assert own.axes[0].get_images()[0].get_array().shape[:2] == (8, 16)
    with pytest.raises(ValueError, match="display_size"):
        figure(image, {"m": torch.rand(2, 4)}, display_size=0)


def test_figure_rejects_mismatched_class_counts():
    with pytest.raises(ValueError, match="same number of classes"):
        figure(torch.rand(3, 8, 8), {"a": torch.rand(2, 4, 4), "b": torch.rand(4, 4)})
    with pytest.raises(ValueError, match="classes names 3 rows"):
        figure(torch.rand(3, 8, 8), {"a": torch.rand(2, 4, 4)}, classes=["x", "y", "z"])


def test_save_png_round_trips(tmp_path):
    fig = figure(np.zeros((8, 8, 3), np.uint8), {"m": torch.rand(4, 4)}, dpi=40, panel_inches=1)
    path = camfunc.viz.save_png(fig, tmp_path / "x.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()
