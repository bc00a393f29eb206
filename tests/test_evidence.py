"""``camfunc explain --expected`` and ``camfunc.explain``: the predicted and expected classes'
maps, a contrastive Finer-CAM map, probabilities and the methods' agreement, in an evidence
bundle whose manifest hashes every file (issue 23, part 2)."""

from __future__ import annotations

import hashlib
import json

import numpy
import pytest
import torch
from helpers import saved_timm
from PIL import Image
from test_cli import camfunc_cli

import camfunc
from camfunc import zoo
from camfunc.models import UsageError, load

METHODS = ["gradcam", "layercam"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A generated scene saved at 80 x 96 (camfunc resizes it whole for the builtin model)."""
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    image = zoo.scenes(1, seed=5).images[0]
    pixels = (image.permute(1, 2, 0) * 255).byte().numpy()
    Image.fromarray(pixels).resize((96, 80)).save(path)
    return path


def model_input(loaded, path):
    _, seen = loaded.read(path)
    return loaded.normalise(seen.unsqueeze(0))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(scene, tmp_path_factory):
    """The CLI's bundle for the scene, expected to be a class other than the one predicted."""
    loaded = load("builtin")
    predicted = int(loaded.model(model_input(loaded, scene)).argmax())
    other = (predicted + 1) % len(loaded.class_names)
    out = tmp_path_factory.mktemp("out")
    args = ["explain", scene, "--expected", loaded.class_names[other], "--out", out]
    done = camfunc_cli(*args, *[a for m in METHODS for a in ("--method", m)])
    assert done.returncode == 0, done.stderr
    return out, predicted, other


def test_manifest_hashes_every_file_written(bundle):
    out, _, _ = bundle
    folder = out / "scene"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert sha256(folder / name) == digest, name
    assert manifest["versions"]["camfunc"] == camfunc.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["input_shape"] == [1, 3, 64, 64] and manifest["layer"] == [zoo.LAYER]
    assert manifest["preprocessing"]["transform"] == "camfunc"
    assert manifest["image"]["size"] == [80, 96]


def test_classes_and_probabilities_are_right(bundle, scene):
    out, predicted, other = bundle
    manifest = json.loads((out / "scene" / "manifest.json").read_text())
    loaded = load("builtin")
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(model_input(loaded, scene))[0], 0)
    assert manifest["predicted"]["class"] == predicted and manifest["expected"]["class"] == other
    assert manifest["expected"]["name"] == zoo.CLASSES[other] and manifest["correct"] is False
    assert manifest["predicted"]["probability"] == pytest.approx(float(probabilities[predicted]), rel=1e-5)
    assert manifest["top"][0]["class"] == predicted
    stored = numpy.load(out / "scene" / "probabilities.npy")
    numpy.testing.assert_allclose(stored, probabilities.detach().numpy(), rtol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    roles = [(e["role"], e["class"]) for e in summary["images"][0]["classes"]]
    assert roles == [("predicted", predicted), ("expected", other)]


def test_maps_equal_the_public_api(bundle, scene):
    out, predicted, other = bundle
    folder = out / "scene"
    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = load("builtin")
    x = model_input(loaded, scene)
    split = camfunc.split(loaded.model, zoo.LAYER)
    for role, c in (("predicted", predicted), ("expected", other)):
        for method in METHODS:
            written = numpy.load(folder / manifest[role]["files"][method]["map"])
            expected = camfunc.METHODS[method](split, x, c)[0]
            numpy.testing.assert_allclose(written, expected.numpy(), rtol=1e-5, atol=1e-6)
    contrast = camfunc.finercam(split, x, predicted, references=[other], gamma=1.0)[0]
    written = numpy.load(folder / manifest["contrastive"]["files"]["map"])
    numpy.testing.assert_allclose(written, contrast.numpy(), rtol=1e-5, atol=1e-6)
    assert manifest["contrastive"]["against"] == [other]
    maps = [camfunc.upsample(camfunc.METHODS[m](split, x, predicted), (64, 64)) for m in METHODS]
    rho = float(camfunc.metrics.spearman(*maps)[0])
    assert manifest["agreement"]["pairs"]["gradcam~layercam"] == pytest.approx(rho, abs=1e-6)


def test_python_function_gives_what_the_bundle_holds(bundle, scene, tmp_path):
    out, predicted, other = bundle
    evidence = camfunc.explain("builtin", scene, expected=other, methods=METHODS)
    assert evidence.manifest is None and not list(tmp_path.iterdir())  # nothing written
    assert (evidence.predicted, evidence.expected, evidence.correct) == (predicted, other, False)
    written = numpy.load(out / "scene" / "gradcam-expected-" f"{zoo.CLASSES[other]}.npy")
    numpy.testing.assert_array_equal(written, evidence.maps["expected"]["gradcam"].numpy())
    agreeing = camfunc.explain("builtin", scene, expected=predicted, methods=["gradcam"])
    assert agreeing.correct is True and agreeing.contrasted_with is None


@pytest.mark.parametrize("given, words", [("giraffe", "unknown expected class 'giraffe'"),
                                           ("7", "out of range"), ("-1", "out of range")])
def test_a_bad_expected_class_is_one_line(scene, tmp_path, given, words):
    done = camfunc_cli("explain", scene, "--expected", given, "--out", tmp_path)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "summary.json").exists()
    with pytest.raises(UsageError, match=words.split("'")[0]):
        camfunc.explain("builtin", scene, expected=given)


def test_expected_with_class_is_refused(scene, tmp_path):
    done = camfunc_cli("explain", scene, "--expected", "0", "--class", "1", "--out", tmp_path)
    assert done.returncode == 2 and "drop --class" in done.stderr


def test_timm_bundle_records_its_own_crop(scene, tmp_path):
    timm = pytest.importorskip("timm")
    saved_timm(tmp_path, "resnet18", 3, {"num_classes": 3, "input_size": [3, 48, 48],
                                         "crop_pct": 0.75, "label_names": ["a", "b", "c"]})
    done = camfunc_cli("explain", scene, "--model", "timm:resnet18", "--weights", tmp_path / "ckpt.pt",
                       "--pretrained-cfg", tmp_path / "cfg.json", "--expected", "b",
                       "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "scene" / "manifest.json").read_text())
    assert manifest["preprocessing"]["transform"] == "timm" and manifest["input_shape"] == [1, 3, 48, 48]
    # 80 x 96 -> shorter side 64 (scale 0.8), 64 x 76; crop 48 from (8, 14): in the image's pixels
    assert manifest["image"]["box"] == pytest.approx([10.0, 17.5, 70.0, 77.5])
    assert manifest["versions"]["timm"] == timm.__version__ and manifest["expected"]["name"] == "b"


def test_the_report_reads_an_expected_folder(bundle):
    out, _, _ = bundle
    done = camfunc_cli("report", out, "--quiet", "--out", out.parent / "report-of-bundle")
    assert done.returncode == 0, done.stderr
    page = (out.parent / "report-of-bundle" / "index.html").read_text()
    assert page.count('"method": "gradcam"') == 2 and page.count('"method": "layercam"') == 2
