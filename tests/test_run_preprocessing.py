"""Dataset runs feed a model as its own library does (issue 23): timm's data config and
transform, a saved Hugging Face folder's image processor. The run's maps equal the Python API's
on the tensor the library itself makes (built here from timm and transformers, not from
camfunc), the manifest records the preprocessing, and the report's overlays are put back on
the original image through the resize and crop.

Tiny random-weight models are saved to a temp folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import numpy
import pytest
import torch
from helpers import saved_timm
from PIL import Image
from test_cli import camfunc_cli
from torch import nn

import camfunc
import camfunc.runs
from camfunc.models import Geometry

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

#: (height, width) and format of the generated pictures: none square, one a JPEG; in the
#: run's dataset order (classes, then paths, sorted).
PICTURES = {"a/tall.png": (100, 50), "a/wide.png": (60, 90), "b/photo.jpg": (77, 64)}
TIMM_CFG = {"num_classes": 2, "input_size": [3, 64, 64], "crop_pct": 0.8,
            "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}
TIMM_LAYER = "layer2"
HF_LAYER = "model.convnext.encoder.stages.1"


def smooth_picture(height: int, width: int, seed: int) -> numpy.ndarray:
    """Waves and a disc: smooth enough that a resized crop of it can be compared with the
    model's pixels, uneven enough that another crop cannot pass for it."""
    rng = numpy.random.default_rng(seed)
    yy, xx = numpy.mgrid[0:height, 0:width] / 40.0
    waves = [numpy.sin(a * xx + b * yy + c) for a, b, c in rng.uniform(0.5, 3.0, (3, 3))]
    pixels = numpy.stack(waves, -1) * 0.35 + 0.5
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    disc = (numpy.mgrid[0:height, 0:width][0] - cy) ** 2 + \
        (numpy.mgrid[0:height, 0:width][1] - cx) ** 2 < (min(height, width) / 5) ** 2
    pixels[disc] = rng.uniform(0, 1, 3)
    return (pixels.clip(0, 1) * 255).round().astype(numpy.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for seed, (name, (height, width)) in enumerate(PICTURES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_picture(height, width, seed)).save(root / name, quality=95)
    return root


@pytest.fixture(scope="module")
def timm_model(tmp_path_factory):
    """A random-weight resnet10t with a non-default pretrained config (crop_pct, mean, std)."""
    return saved_timm(tmp_path_factory.mktemp("timm"), "resnet10t", 2, TIMM_CFG)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random-weight ConvNeXt classifier with a cropping image processor, saved."""
    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32],
                                         depths=[1, 1, 1, 1], num_labels=2, image_size=64)
    transformers.ConvNextForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.75,
                                        image_mean=[0.5, 0.4, 0.3],
                                        image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def rgb(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def timm_own(folder):
    """The model and its own eval transform, as timm users make them."""
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2,
                              pretrained_cfg_overlay=TIMM_CFG)
    model.load_state_dict(torch.load(folder / "ckpt.pt", weights_only=True))
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config)
    return model.eval(), lambda path: transform(rgb(path)), config


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def hf_own(folder):
    """The model and its own processor, as transformers users make them."""
    model = transformers.AutoModelForImageClassification.from_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)

    def tensor(path):
        return processor(images=rgb(path), return_tensors="pt")["pixel_values"][0]
    return Logits(model).eval(), tensor, processor


def run_cli(data, out, *args):
    done = camfunc_cli("run", data, "--out", out, "--classes", "true", "--map-dtype", "float32",
                       "--batch-size", "2", "--no-progress", "--device", "cpu", *args)
    assert done.returncode == 0, done.stderr
    return done, json.loads((out / "manifest.json").read_text())


def api_maps(model, layer, tensor, data):
    """gradcam from the Python API on each image's own preprocessed tensor, its folder's class."""
    tensors = {name: tensor(data / name)[None] for name in PICTURES}
    split = camfunc.split(model, layer, example_input=next(iter(tensors.values())))
    return torch.stack([camfunc.gradcam(split, x, 0 if name.startswith("a/") else 1)[0]
                        for name, x in tensors.items()])


def assert_maps_equal(out, expected):
    indices, maps = camfunc.runs.read_maps(out, "gradcam")
    assert indices.tolist() == list(range(len(PICTURES)))
    assert maps.shape[:2] == (len(PICTURES), 1) and maps[:, 0].shape == expected.shape
    assert expected.flatten(1).std(1).min() > 0.05  # maps with something in them
    difference = (maps[:, 0] - expected).abs().max().item()
    print(f"max abs difference run vs API: {difference:.2e}")
    assert difference < 1e-5, difference


def test_timm_run_maps_equal_the_api_on_timms_own_tensor(timm_model, data, tmp_path):
    out = tmp_path / "out"
    done, manifest = run_cli(data, out, "--model", "timm:resnet10t", "--layer", TIMM_LAYER,
                             "--weights", timm_model / "ckpt.pt",
                             "--pretrained-cfg", timm_model / "cfg.json")
    model, tensor, config = timm_own(timm_model)
    assert config["crop_pct"] == 0.8 and "note" not in done.stderr
    assert_maps_equal(out, api_maps(model, TIMM_LAYER, tensor, data))
    recorded = manifest["preprocessing"]
    assert recorded["transform"] == "timm" and recorded["resize_kind"] == "shorter side"
    assert recorded["resize"] == math.floor(64 / 0.8) and recorded["center_crop"] == [64, 64]
    assert recorded["mean"] == config["mean"] and recorded["std"] == config["std"]
    assert recorded["configured"]["interpolation"] == config["interpolation"]
    assert manifest["settings"]["model"]["preprocessing"] == recorded  # in the fingerprint


def test_hf_run_maps_equal_the_api_on_the_processors_own_tensor(hf_model, data, tmp_path):
    out = tmp_path / "out"
    _, manifest = run_cli(data, out, "--model", f"hf:{hf_model}", "--layer", HF_LAYER)
    model, tensor, processor = hf_own(hf_model)
    assert_maps_equal(out, api_maps(model, HF_LAYER, tensor, data))
    recorded = manifest["preprocessing"]
    assert recorded["transform"] == "hf" and recorded["center_crop"] == [64, 64]
    assert recorded["resize"] == int(64 / 0.75) and recorded["crop_offset"] == "floor"
    assert recorded["configured"]["processor"] == type(processor).__name__
    assert recorded["mean"] == list(processor.image_mean)


def test_the_recorded_crop_is_where_the_model_looked(timm_model, data, tmp_path):
    """The box the manifest's geometry gives, cut from the original and resized, is the
    picture timm fed the model; the whole image resized is not."""
    _, manifest = run_cli(data, tmp_path / "out", "--model", "timm:resnet10t",
                          "--layer", TIMM_LAYER, "--weights", timm_model / "ckpt.pt",
                          "--pretrained-cfg", timm_model / "cfg.json")
    geometry = Geometry.from_record(manifest["preprocessing"])
    _, tensor, config = timm_own(timm_model)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    for name, (height, width) in PICTURES.items():
        seen = tensor(data / name) * std + mean
        original = rgb(data / name)
        top, left, bottom, right = (round(v) for v in geometry.box(height, width))

        def gap(picture):
            resized = numpy.asarray(picture.resize((64, 64), Image.BILINEAR)) / 255.0
            return float(numpy.abs(resized - seen.permute(1, 2, 0).numpy()).mean())

        cropped, whole = gap(original.crop((left, top, right, bottom))), gap(original)
        print(f"{name}: crop box {top, left, bottom, right}, mean abs gap {cropped:.4f}, "
              f"whole image {whole:.4f}")
        assert cropped < 0.02 and whole > 2 * cropped, (cropped, whole)


def test_the_reports_overlays_lie_on_the_original_image(timm_model, data, tmp_path):
    out = tmp_path / "out"
    run_cli(data, out, "--model", "timm:resnet10t", "--layer", TIMM_LAYER, "--metrics",
            "--weights", timm_model / "ckpt.pt", "--pretrained-cfg", timm_model / "cfg.json")
    done = camfunc_cli("report", out, "--quiet")
    assert done.returncode == 0, done.stderr
    thumbs = sorted((out / "report" / "thumbs").glob("*.png"))
    sizes = {}
    for path in thumbs:
        with Image.open(path) as thumb:
            sizes[int(path.name.split("-")[0])] = thumb.size
    for index, (height, width) in enumerate(PICTURES.values()):  # (w, h), at most 128 px
        scale = min(1.0, 128 / max(height, width))
        assert sizes[index] == pytest.approx((width * scale, height * scale), abs=1), sizes


def test_size_and_mean_std_override_explicitly(timm_model, data, tmp_path):
    args = ("--model", "timm:resnet10t", "--layer", TIMM_LAYER,
            "--weights", timm_model / "ckpt.pt", "--pretrained-cfg", timm_model / "cfg.json")
    _, resized = run_cli(data, tmp_path / "sized", *args, "--size", "48")
    assert resized["preprocessing"]["transform"] == "camfunc"
    assert resized["preprocessing"]["input_size"] == [3, 48, 48]
    _, normalised = run_cli(data, tmp_path / "normalised", *args, "--mean", "0,0,0", "--std", "1,1,1")
    assert normalised["preprocessing"]["transform"] == "timm"
    assert normalised["preprocessing"]["mean"] == [0, 0, 0]
    assert len({resized["fingerprint"], normalised["fingerprint"]}) == 2


def test_the_device_decoder_gives_way_to_the_models_transform_and_says_so(timm_model, data,
                                                                           tmp_path):
    args = ("--model", "timm:resnet10t", "--layer", TIMM_LAYER,
            "--weights", timm_model / "ckpt.pt", "--pretrained-cfg", timm_model / "cfg.json")
    done, manifest = run_cli(data, tmp_path / "device", *args, "--decode", "device")
    assert "decoded by Pillow" in done.stderr and done.stderr.count("note") == 1, done.stderr
    assert manifest["run"]["decode"] == "pillow" and len(manifest["run"]["notes"]) == 1
    model, tensor, _ = timm_own(timm_model)
    assert_maps_equal(tmp_path / "device", api_maps(model, TIMM_LAYER, tensor, data))


def test_scenes_are_resized_whole_and_the_manifest_says_so(timm_model, tmp_path):
    result = camfunc.runs.run("scenes:2", tmp_path / "out", model="timm:resnet10t",
                              weights=str(timm_model / "ckpt.pt"), layer=TIMM_LAYER,
                              pretrained_cfg=str(timm_model / "cfg.json"), progress=False)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["preprocessing"]["transform"] == "camfunc"
    assert "scenes are resized whole" in manifest["run"]["notes"][0]


def test_evaluate_scores_the_maps_of_timms_own_tensor(timm_model, data, tmp_path):
    """``camfunc evaluate`` already fed the model's own transform; pinned here as well."""
    done = camfunc_cli("evaluate", data, "--model", "timm:resnet10t", "--layer", TIMM_LAYER,
                       "--weights", timm_model / "ckpt.pt", "--pretrained-cfg",
                       timm_model / "cfg.json", "--metric", "confidence", "--class", "1",
                       "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["preprocessing"]["transform"] == "timm"
    model, tensor, _ = timm_own(timm_model)
    x = torch.stack([tensor(data / name) for name in PICTURES])
    split = camfunc.split(model, TIMM_LAYER)
    cls = torch.ones(len(PICTURES), dtype=torch.long)
    drop = camfunc.metrics.confidence_change(split, x, camfunc.gradcam(split, x, cls), cls).drop
    numpy.testing.assert_allclose([row["drop"] for row in written["images"]], drop.numpy(),
                                  rtol=1e-4, atol=1e-6)
