"""Models users have (issue 23): ``timm:NAME`` and ``hf:PATH`` specs, fed as their own configs
say, with their class names; the CLI's maps equal the Python API's on the same tensor.

Tiny random-weight models are saved to a temp folder; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from helpers import saved_timm
from PIL import Image
from test_cli import camfunc_cli

import camfunc
from camfunc._util.images import read_image
from camfunc.models import UsageError, load

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

LABELS = {0: "cat", 1: "dog", 2: "owl"}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    pixels = numpy.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=numpy.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_resnet(tmp_path_factory):
    return saved_timm(tmp_path_factory.mktemp("timm"), "resnet18", 5, {
        "num_classes": 5, "input_size": [3, 48, 48], "mean": [0.1, 0.2, 0.3],
        "std": [0.3, 0.2, 0.1], "interpolation": "bilinear", "label_names": ["a", "b", "c", "d", "e"]})


def api_maps(loaded, layer, picture, cls):
    """gradcam from the Python API on the tensor camfunc's own resize gives (``--size``)."""
    _, resized = read_image(picture, loaded.size, channels=loaded.channels)
    return api_maps_of(loaded, layer, loaded.normalise(resized.unsqueeze(0)), cls)


def api_maps_of(loaded, layer, x, cls):
    """gradcam from the Python API on the tensor ``x``."""
    return camfunc.gradcam(camfunc.split(loaded.model, layer, example_input=x), x, cls)


def hf_tensor(folder, picture):
    """The picture as the HF image processor itself makes it (normalised)."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return processor(images=Image.open(picture).convert("RGB"), return_tensors="pt")["pixel_values"]


def timm_tensor(model, picture):
    """The picture as timm's own eval transform makes it (resolve_data_config + create_transform)."""
    config = timm.data.resolve_data_config(model=model)
    return timm.data.create_transform(**config)(Image.open(picture).convert("RGB")).unsqueeze(0)


def test_hf_folder_loads_with_its_processor_and_labels(hf_vit):
    loaded = load(f"hf:{hf_vit}")
    assert loaded.size == (32, 32)
    assert loaded.mean == (0.5, 0.4, 0.3) and loaded.std == (0.2, 0.25, 0.3)
    assert loaded.class_names == ("cat", "dog", "owl")
    assert loaded.preprocessing()["source"] == "hf"
    assert load(f"hf:{hf_vit}", size=64).size == (64, 64)


def test_timm_overlay_gives_size_normalisation_and_names(timm_resnet):
    loaded = load("timm:resnet18", str(timm_resnet / "ckpt.pt"),
                  pretrained_cfg=str(timm_resnet / "cfg.json"))
    assert loaded.size == (48, 48)
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.3, 0.2, 0.1)
    assert loaded.class_names == ("a", "b", "c", "d", "e")
    saved = torch.load(timm_resnet / "ckpt.pt", weights_only=True)
    assert torch.equal(loaded.model.state_dict()["fc.weight"], saved["fc.weight"])


def test_explain_hf_maps_equal_the_api(hf_vit, picture, tmp_path):
    done = camfunc_cli("explain", picture, "--model", f"hf:{hf_vit}", "--class", "dog",
                       "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preprocessing"]["source"] == "hf"
    assert summary["preprocessing"]["mean"] == [0.5, 0.4, 0.3]
    assert summary["preprocessing"]["configured"]["size"] == {"height": 32, "width": 32}
    entry = summary["images"][0]["classes"][0]
    assert entry["name"] == "dog"
    written = numpy.load(entry["maps"]["gradcam"])
    x = hf_tensor(hf_vit, picture)
    expected = api_maps_of(load(f"hf:{hf_vit}"), summary["layer"][0], x, 1)[0]
    numpy.testing.assert_allclose(written, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_explain_timm_maps_equal_the_api(timm_resnet, picture, tmp_path):
    weights, cfg = str(timm_resnet / "ckpt.pt"), str(timm_resnet / "cfg.json")
    done = camfunc_cli("explain", picture, "--model", "timm:resnet18", "--weights", weights,
                       "--pretrained-cfg", cfg, "--class", "2", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preprocessing"]["input_size"] == [3, 48, 48]
    assert summary["preprocessing"]["configured"]["interpolation"] == "bilinear"
    entry = summary["images"][0]["classes"][0]
    assert entry["name"] == "c"
    loaded = load("timm:resnet18", weights, pretrained_cfg=cfg)
    expected = api_maps_of(loaded, summary["layer"][0], timm_tensor(loaded.model, picture), 2)[0]
    numpy.testing.assert_allclose(numpy.load(entry["maps"]["gradcam"]), expected.numpy(),
                                  rtol=1e-5, atol=1e-6)


def test_mean_std_override_and_its_errors(hf_vit, picture, tmp_path):
    done = camfunc_cli("explain", picture, "--model", f"hf:{hf_vit}", "--mean", "0,0,0",
                       "--std", "1,1,1", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["preprocessing"]["std"] == [1, 1, 1]
    bad = camfunc_cli("explain", picture, "--model", f"hf:{hf_vit}", "--mean", "0,0",
                      "--std", "1,1", "--out", tmp_path)
    assert bad.returncode == 2 and "3 values each" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    alone = camfunc_cli("explain", picture, "--model", f"hf:{hf_vit}", "--mean", "0,0,0",
                        "--out", tmp_path)
    assert alone.returncode == 2 and "together" in alone.stderr


def test_torchvision_takes_its_weights_transforms_and_categories():
    loaded = load("torchvision:resnet18")
    assert loaded.size == (224, 224) and loaded.source == "torchvision"
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.class_names[0] == "tench"
    assert loaded.preprocessing()["configured"] == {"resize_size": [256], "crop_size": [224],
                                                    "interpolation": "bilinear"}
    assert load("torchvision:resnet18", size=96).size == (96, 96)


def test_bad_specs_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(UsageError, match="cannot load the hf model"):
        load(f"hf:{tmp_path}")
    with pytest.raises(UsageError, match="unknown timm model"):
        load("timm:no_such_net")
    with pytest.raises(UsageError, match="for timm: models"):
        load("builtin", pretrained_cfg="x.json")


def test_run_on_a_folder_with_an_hf_spec(hf_vit, picture, tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.open(picture).save(tmp_path / "data" / label / "a.png")
    result = camfunc.runs.run(tmp_path / "data", tmp_path / "out", model=f"hf:{hf_vit}",
                              progress=False)
    assert not result.failed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "hf" in json.dumps(manifest) and [32, 32] == manifest_size(manifest)


def manifest_size(manifest: dict) -> list:
    """The model's input size wherever the manifest records it."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "size" in value and "mean" in value:
                found.append(value["size"])
            for item in value.values():
                walk(item)
    walk(manifest)
    return found[0]


def test_crop_box_by_hand():
    from camfunc.models._crop import crop_box

    # 300 x 400 -> shorter side 256: 256 x 341 (scale 256/300); centre crop 224: offsets
    # round(32/2) = 16 and round(117/2) = 58 (half to even), back in original pixels / (256/300).
    top, left, bottom, right = crop_box(300, 400, 256, (224, 224))
    assert (top, left) == pytest.approx((16 * 300 / 256, 58 * 300 / 256))
    assert (bottom, right) == pytest.approx((240 * 300 / 256, 282 * 300 / 256))
    # No resize: the whole image; a crop larger than the resized image is clipped to it.
    assert crop_box(30, 40, None, (8, 8)) == (0.0, 0.0, 30.0, 40.0)
    assert crop_box(100, 100, 50, (64, 64)) == (0.0, 0.0, 100.0, 100.0)
    # As torchvision crops: 10 x 13 -> Resize(10) keeps it, CenterCrop(8) starts at round(2.5) = 2.
    from torchvision.transforms import v2

    grid = torch.arange(130.0).view(1, 10, 13)
    seen = v2.CenterCrop(8)(v2.Resize(10)(grid))
    top, left, _, _ = crop_box(10, 13, 10, (8, 8))
    assert seen[0, 0, 0] == grid[0, int(top), int(left)]


def test_hf_resnet_with_a_shortest_edge_processor(tmp_path, picture):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=2, id2label={0: "no", 1: "yes"},
                                       label2id={"no": 0, "yes": 1})
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "m")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 40}).save_pretrained(tmp_path / "m")
    loaded = load(f"hf:{tmp_path / 'm'}")
    assert loaded.size == (40, 40) and loaded.class_names == ("no", "yes")
    done = camfunc_cli("explain", picture, "--model", f"hf:{tmp_path / 'm'}", "--class", "yes",
                       "--layer", "model.resnet.encoder.stages.1", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entry = summary["images"][0]["classes"][0]
    x = hf_tensor(tmp_path / "m", picture)
    expected = api_maps_of(loaded, summary["layer"][0], x, 1)[0]
    numpy.testing.assert_allclose(numpy.load(entry["maps"]["gradcam"]), expected.numpy(),
                                  rtol=1e-5, atol=1e-5)
    # ConvNeXt's processor: shorter side 40 -> int(40 / 0.875) = 45, so 40 x 48 -> 45 x 54,
    # centre-cropped to 40 x 40 from (45 - 40) // 2 = 2, (54 - 40) // 2 = 7 (HF floors).
    scale = 45 / 40
    assert summary["images"][0]["box"] == pytest.approx([2 / scale, 7 / scale, 42 / scale, 47 / scale])
    assert summary["preprocessing"]["resize"] == 45
    assert summary["preprocessing"]["center_crop"] == [40, 40]


def test_timm_tiny_vit_loads_at_its_configured_size(tmp_path, picture):
    (tmp_path / "cfg.json").write_text(json.dumps({"num_classes": 3, "input_size": [3, 32, 32]}))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    loaded = load("timm:vit_tiny_patch16_224", str(tmp_path / "vit.pt"),
                  pretrained_cfg=str(tmp_path / "cfg.json"))
    assert loaded.size == (32, 32) and loaded.class_names is None


def test_timm_crop_is_its_own_and_the_overlay_maps_back(timm_resnet, picture, tmp_path):
    """crop_pct 0.75 at 48 px: timm resizes the shorter side to int(48 / 0.75) = 64 and crops
    48 x 48. The 40 x 48 picture becomes 64 x 76 (scale 1.6), cropped from round(8) = 8,
    round(14) = 14: (5, 8.75, 35, 38.75) in the picture's pixels."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**json.loads((timm_resnet / "cfg.json").read_text()),
                               "crop_pct": 0.75, "crop_mode": "center"}))
    weights = str(timm_resnet / "ckpt.pt")
    done = camfunc_cli("explain", picture, "--model", "timm:resnet18", "--weights", weights,
                       "--pretrained-cfg", cfg, "--class", "1", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["preprocessing"]["transform"] == "timm"
    assert summary["preprocessing"]["resize"] == 64 and summary["preprocessing"]["center_crop"] == [48, 48]
    record = summary["images"][0]
    assert record["box"] == pytest.approx([5.0, 8.75, 35.0, 38.75]) and record["size"] == [40, 48]
    loaded = load("timm:resnet18", weights, pretrained_cfg=str(cfg))
    cam = api_maps_of(loaded, summary["layer"][0], timm_tensor(loaded.model, picture), 1)[0]
    entry = record["classes"][0]
    numpy.testing.assert_allclose(numpy.load(entry["maps"]["gradcam"]), cam.numpy(), rtol=1e-5, atol=1e-6)
    # The overlay: the map resized into rows 5..35 and columns 9..39 (rounded), zero elsewhere.
    back = torch.zeros(40, 48)
    back[5:35, 9:39] = torch.nn.functional.interpolate(cam[None, None], size=(30, 30), mode="bilinear",
                                                       align_corners=False)[0, 0]
    original = torch.from_numpy(numpy.asarray(Image.open(picture), dtype=numpy.float32) / 255).permute(2, 0, 1)
    expected = numpy.asarray(camfunc.viz.overlay(original, back))
    written = numpy.asarray(Image.open(entry["overlays"]["gradcam"]))
    assert written.shape == (40, 48, 3)
    assert numpy.abs(written.astype(int) - expected.astype(int)).max() <= 1
    # --size is camfunc's whole-image resize, explicitly: the whole picture is the box.
    done = camfunc_cli("explain", picture, "--model", "timm:resnet18", "--weights", weights,
                       "--pretrained-cfg", cfg, "--size", "48", "--out", tmp_path / "sized")
    sized = json.loads((tmp_path / "sized" / "summary.json").read_text())
    assert sized["preprocessing"]["transform"] == "camfunc" and sized["images"][0]["box"] == [0, 0, 40, 48]


def test_timm_squash_crop_maps_back_and_border_is_refused(timm_resnet, picture, tmp_path):
    """crop_mode squash: the whole 40 x 48 picture resized to 64 x 64, cropped 48 x 48 from
    (8, 8): rows 8 * 40 / 64 = 5 to 35, columns 8 * 48 / 64 = 6 to 42. crop_mode border (a
    keep-ratio resize then a crop or pad) cannot be followed back: a one-line error."""
    base = json.loads((timm_resnet / "cfg.json").read_text())
    for mode in ("squash", "border"):
        (tmp_path / f"{mode}.json").write_text(json.dumps({**base, "crop_pct": 0.75, "crop_mode": mode}))
    loaded = load("timm:resnet18", pretrained_cfg=str(tmp_path / "squash.json"))
    assert loaded.box(40, 48) == pytest.approx((5.0, 6.0, 35.0, 42.0))
    _, seen = loaded.read(picture)
    x = timm_tensor(loaded.model, picture)
    torch.testing.assert_close(loaded.normalise(seen.unsqueeze(0)), x, rtol=1e-6, atol=1e-6)
    with pytest.raises(UsageError, match="ResizeKeepRatio.*--size"):
        load("timm:resnet18", pretrained_cfg=str(tmp_path / "border.json"))
    assert load("timm:resnet18", size=48, pretrained_cfg=str(tmp_path / "border.json")).pipeline is None


def test_torchvision_pixels_are_its_weights_transforms(picture):
    torchvision = pytest.importorskip("torchvision")
    loaded = load("torchvision:resnet18")
    transform = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
    _, seen = loaded.read(picture)
    expected = transform(Image.open(picture).convert("RGB")).unsqueeze(0)
    torch.testing.assert_close(loaded.normalise(seen.unsqueeze(0)), expected, rtol=1e-6, atol=1e-6)
    # 40 x 48 -> shorter side 256 (scale 6.4), 256 x 307, crop 224 from (16, round(41.5) = 42)
    assert loaded.box(40, 48) == pytest.approx((16 / 6.4, 42 / 6.4, 240 / 6.4, 266 / 6.4))
