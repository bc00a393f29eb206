"""Images read as they are: each Pillow mode against an exact 8-bit or float twin, EXIF
orientation, the channels the model takes, and JPEGs decoded on the device (here the CPU).

A twin holds the same picture in a plainer form (an 8-bit gray image for a 16-bit one,
RGB for CMYK with no black), so what the reader gives is pinned by hand, not by itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import camfunc
from camfunc._util.images import read_image, read_resized, read_resized_bytes
from camfunc.runs import read_maps, run as run_dataset

H, W = 12, 20
RNG = np.random.default_rng(7)
GRAY = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 as float (C, H, W) / 255: what an 8-bit twin reads as."""
    pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
    return torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)


def three(t: torch.Tensor) -> torch.Tensor:
    return t.expand(3, *t.shape[1:]) if t.shape[0] == 1 else t


def palette_image(alpha: bool) -> Image.Image:
    image = Image.fromarray(GRAY, mode="L").convert("P")  # indices = GRAY
    image.putpalette(PALETTE.reshape(-1).tolist())
    if alpha:
        image = image.convert("PA")
        image.putalpha(Image.fromarray(ALPHA, mode="L"))
    return image


def cmyk_without_black() -> Image.Image:
    return Image.fromarray(np.dstack([255 - RGB, np.zeros((H, W), np.uint8)]), mode="CMYK")


# mode -> (image, suffix it is stored with, its twin as read: float (C, H, W))
MODES = {
    "1": (Image.fromarray(GRAY >= 128).convert("1"), ".png", chw((GRAY >= 128).astype(np.uint8) * 255)),
    "L": (Image.fromarray(GRAY, mode="L"), ".png", chw(GRAY)),
    "LA": (Image.fromarray(np.dstack([GRAY, ALPHA]), mode="LA"), ".png", chw(GRAY)),
    "P": (palette_image(False), ".png", chw(PALETTE[GRAY])),
    "PA": (palette_image(True), ".tif", chw(PALETTE[GRAY])),
    "RGB": (Image.fromarray(RGB, mode="RGB"), ".png", chw(RGB)),
    "RGBA": (Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA"), ".png", chw(RGB)),
    "CMYK": (cmyk_without_black(), ".tif", chw(RGB)),
    "I;16": (Image.fromarray(GRAY.astype(np.uint16) * 257), ".png", chw(GRAY)),
    "I;16B": (Image.frombytes("I;16B", (W, H), (GRAY.astype(">u2") * 257).tobytes()), ".tif",
              chw(GRAY)),
    "I": (Image.fromarray(GRAY.astype(np.int32) * 257), ".tif", chw(GRAY)),
    "F": (Image.fromarray(GRAY.astype(np.float32) / np.float32(255)), ".tif", chw(GRAY)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_reads_as_its_twin(mode, tmp_path):
    image, suffix, twin = MODES[mode]
    assert image.mode == mode
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds this mode
    torch.testing.assert_close(read_resized(path, (H, W)), three(twin), atol=0, rtol=0)
    shown, taken = read_image(path, (H, W))
    torch.testing.assert_close(shown, three(twin), atol=0, rtol=0)
    torch.testing.assert_close(taken, three(twin), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_resize_as_their_twins_do(mode, tmp_path):
    image, suffix, _ = MODES[mode]
    image.save(tmp_path / f"deep{suffix}")
    Image.fromarray(GRAY, mode="L").save(tmp_path / "twin.png")
    deep = read_resized(tmp_path / f"deep{suffix}", (9, 31))
    eight = read_resized(tmp_path / "twin.png", (9, 31))
    assert deep.dtype == torch.float32 and deep.shape == (3, 9, 31)
    # Pillow resamples 8-bit images in fixed point and rounds to a level; the deep path does not.
    torch.testing.assert_close(deep, eight, atol=1 / 255 + 1e-6, rtol=0)
    assert 0 <= float(deep.min()) and float(deep.max()) <= 1


def test_a_sixteen_bit_image_is_never_clipped_to_white(tmp_path):
    Image.fromarray(GRAY.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    read = read_resized(tmp_path / "deep.png", (H, W))
    assert float(read.mean()) == pytest.approx(float(GRAY.mean()) / 255, abs=1e-6)
    assert float(read.mean()) < 0.9  # not the white image convert("RGB") made of it


@given(low=st.integers(-2**31, 2**31 - 2), span=st.integers(1, 2**32), ties=st.booleans())
def test_an_int_image_beyond_sixteen_bits_is_scaled_by_its_own_range(low, span, ties, tmp_path_factory):
    high = min(low + span, 2**31 - 1)
    values = np.linspace(low, high, H * W).round().astype(np.int64)
    if ties:
        values[::2] = low
    values = values.reshape(H, W).astype(np.int32)
    path = tmp_path_factory.mktemp("int") / "deep.tif"
    Image.fromarray(values).save(path)
    read = read_resized(path, (H, W))[0].double()
    if 0 <= values.min() and values.max() <= 65535:
        want = torch.from_numpy(values.astype(np.float64) / 65535)
    else:
        lo, hi = float(values.min()), float(values.max())
        want = torch.from_numpy((values.astype(np.float64) - lo) / (hi - lo)) if hi > lo \
            else torch.zeros(H, W, dtype=torch.float64)
    torch.testing.assert_close(read, want, atol=1e-6, rtol=0)


@given(values=st.lists(st.floats(-1e6, 1e6, allow_subnormal=True, width=32), min_size=H * W,
                       max_size=H * W))
def test_a_float_image_is_kept_within_unit_range_else_scaled_by_its_own(values, tmp_path_factory):
    pixels = np.asarray(values, dtype=np.float32).reshape(H, W)
    path = tmp_path_factory.mktemp("float") / "deep.tif"
    Image.fromarray(pixels).save(path)
    read = read_resized(path, (H, W))[0].double()
    lo, hi = float(pixels.min()), float(pixels.max())
    if 0 <= lo and hi <= 1:
        want = torch.from_numpy(pixels.astype(np.float64))
    elif hi > lo:
        want = torch.from_numpy((pixels.astype(np.float64) - lo) / (hi - lo))
    else:
        want = torch.zeros(H, W, dtype=torch.float64)
    torch.testing.assert_close(read, want, atol=1e-6, rtol=0)
    assert 0 <= float(read.min()) and float(read.max()) <= 1


def test_a_float_image_with_nan_is_a_one_line_error(tmp_path):
    pixels = np.zeros((H, W), np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif \(F\) holds NaN or infinite values"):
        read_resized(tmp_path / "nan.tif", (H, W))


def test_grayscale_goes_to_three_channels_only_when_the_model_wants_three(tmp_path):
    Image.fromarray(GRAY, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(GRAY.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(RGB, mode="RGB").save(tmp_path / "rgb.png")
    for name in ("gray.png", "deep.png"):
        torch.testing.assert_close(read_resized(tmp_path / name, (H, W), channels=1), chw(GRAY),
                                   atol=0, rtol=0)
    luma = np.asarray(Image.fromarray(RGB, mode="RGB").convert("L"))  # ITU-R 601, Pillow's
    torch.testing.assert_close(read_resized(tmp_path / "rgb.png", (H, W), channels=1), chw(luma),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="models taking 4 channels are not supported"):
        read_resized(tmp_path / "rgb.png", (H, W), channels=4)


def with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    return image


@pytest.mark.parametrize("orientation, turn", [(3, Image.Transpose.ROTATE_180),
                                               (6, Image.Transpose.ROTATE_270),
                                               (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied_unless_asked_not_to(orientation, turn, tmp_path):
    path = tmp_path / "phone.png"
    Image.fromarray(RGB, mode="RGB").save(path, exif=with_orientation(Image.new("RGB", (1, 1)),
                                                                      orientation).info["exif"])
    upright = np.asarray(Image.fromarray(RGB, mode="RGB").transpose(turn))
    size = upright.shape[:2]
    shown, taken = read_image(path, size)
    torch.testing.assert_close(shown, chw(upright), atol=0, rtol=0)
    torch.testing.assert_close(taken, chw(upright), atol=0, rtol=0)
    stored, _ = read_image(path, (H, W), exif=False)
    torch.testing.assert_close(stored, chw(RGB), atol=0, rtol=0)


def model_sized_folder(root, images: dict[str, Image.Image]):
    """One image per file in ROOT/circle/, at the embedded model's 64 px."""
    (root / "circle").mkdir(parents=True)
    for name, image in images.items():
        image.save(root / "circle" / name)
    return root


def test_every_mode_gives_its_twins_map_in_a_run(tmp_path):
    from camfunc import zoo

    picture = zoo.scenes(1, seed=3).images[0].permute(1, 2, 0).numpy()
    rgb = (picture * 255).round().astype(np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    cmyk = Image.fromarray(np.dstack([255 - rgb, np.zeros(gray.shape, np.uint8)]), mode="CMYK")
    modes = {"a-rgb.png": Image.fromarray(rgb), "b-rgba.png": Image.fromarray(
        np.dstack([rgb, np.full(gray.shape, 9, np.uint8)])), "c-cmyk.tif": cmyk,
        "d-l.png": Image.fromarray(gray), "e-i16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "f-i.tif": Image.fromarray(gray.astype(np.int32) * 257),
        "g-f.tif": Image.fromarray(gray.astype(np.float32) / np.float32(255))}
    twins = {"a-rgb.png": Image.fromarray(rgb), "b-rgba.png": Image.fromarray(rgb),
             "c-cmyk.tif": Image.fromarray(rgb), **{name: Image.fromarray(gray).convert("RGB")
                                                    for name in ("d-l.png", "e-i16.png", "f-i.tif",
                                                                 "g-f.tif")}}
    args = dict(methods=["gradcam"], classes="top2", map_dtype="float32", batch_size=3,
                progress=False)
    run_dataset(model_sized_folder(tmp_path / "modes", modes), tmp_path / "a", **args)
    run_dataset(model_sized_folder(tmp_path / "twins", twins), tmp_path / "b", **args)
    _, got = read_maps(tmp_path / "a", "gradcam")
    _, want = read_maps(tmp_path / "b", "gradcam")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.flatten(1).std(1).min() > 0  # real maps


def jpeg(pixels: np.ndarray, path, **options) -> None:
    Image.fromarray(pixels).save(path, format="JPEG", quality=92, **options)


def test_device_decoding_on_the_cpu_gives_the_pillow_runs_maps(tmp_path):
    from camfunc import zoo

    root = tmp_path / "images"
    scenes = zoo.scenes(7, seed=4).images.permute(0, 2, 3, 1).numpy()
    for i, picture in enumerate(scenes):
        folder = root / zoo.CLASSES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (picture * 255).round().astype(np.uint8)
        if i == 5:  # not a JPEG: Pillow, in the worker
            Image.fromarray(pixels).save(folder / f"{i}.png")
        elif i == 6:  # a JPEG stored sideways: turned on the device too
            Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(
                folder / f"{i}.jpg", quality=92,
                exif=with_orientation(Image.new("RGB", (1, 1)), 8).info["exif"])
        else:
            jpeg(pixels, folder / f"{i}.jpg", progressive=i == 2)
    (root / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"not really" * 8)
    args = dict(methods=["gradcam"], classes="top2", map_dtype="float32", batch_size=4,
                progress=False)
    pillow = run_dataset(root, tmp_path / "pillow", decode="pillow", **args)
    device = run_dataset(root, tmp_path / "device", decode="device", device="cpu", **args)
    assert (pillow.images, pillow.failed) == (device.images, device.failed) == (7, 1)
    index_p, maps_p = read_maps(tmp_path / "pillow", "gradcam")
    index_d, maps_d = read_maps(tmp_path / "device", "gradcam")
    assert torch.equal(index_p, index_d)
    torch.testing.assert_close(maps_d, maps_p, atol=1e-6, rtol=0)  # same libjpeg, same size
    import json
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("pillow", "device")]
    assert [m["run"]["decode"] for m in manifests] == ["pillow", "device"]
    assert [f["name"] for f in manifests[1]["failed"]] == ["circle/broken.jpg"]
    assert "broken.jpg" in manifests[1]["failed"][0]["reason"]


def test_device_resizing_is_pillows_bilinear_within_a_level(tmp_path):
    from camfunc.runs._decode import resized

    pixels = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels[:, :26] = 200  # flat parts and edges
    for size in ((16, 16), (20, 33), (50, 70)):
        pillow = read_resized_bytes(_saved(tmp_path, pixels), size)
        device = resized(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), size)
        assert device.dtype == torch.uint8 and device.shape == pillow.shape
        assert int((device.int() - pillow.int()).abs().max()) <= 1


def _saved(tmp_path, pixels):
    path = tmp_path / "resize.png"
    Image.fromarray(pixels).save(path)
    return path


def test_bad_reading_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="decode must be one of auto, pillow, device, got 'gpu'"):
        camfunc.runs.run("scenes:2", tmp_path / "out", decode="gpu", progress=False)
    with pytest.raises(ValueError, match="exif must be True or False, got 'no'"):
        camfunc.runs.run("scenes:2", tmp_path / "out", exif="no", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_palette_with_transparency_reads_as_its_colours_without_a_warning(tmp_path):
    image = palette_image(False)
    image.save(tmp_path / "clear.png", transparency=bytes(range(256)))  # per-entry alpha
    with Image.open(tmp_path / "clear.png") as stored:
        assert isinstance(stored.info.get("transparency"), bytes)
    # pyproject turns warnings into errors: Pillow's "convert to RGBA first" would fail here.
    torch.testing.assert_close(read_resized(tmp_path / "clear.png", (H, W)), chw(PALETTE[GRAY]),
                               atol=0, rtol=0)
