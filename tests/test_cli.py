"""The command line, run for real in a subprocess on small inputs; its files checked."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from camfunc import zoo
from camfunc.cli import main


def camfunc_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``camfunc ARGS`` run in this process through ``camfunc.cli.main`` (a subprocess each cost
    seconds of imports): its exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            contextlib.chdir(cwd or os.getcwd()):
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse's usage errors and --version
            status = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two generated scenes saved at odd sizes, a corrupt file and a truncated PNG."""
    folder = tmp_path_factory.mktemp("images")
    data = zoo.scenes(2, seed=11)
    paths = []
    for i, (image, size) in enumerate(zip(data.images, [(80, 96), (64, 64)])):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"scene{i}.png"
        Image.fromarray(pixels).resize((size[1], size[0])).save(path)
        paths.append(path)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:200])
    return {"good": paths, "corrupt": corrupt, "truncated": truncated, "labels": data.labels}


def png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_explain_writes_an_overlay_per_image_method_and_class(images, tmp_path):
    out = tmp_path / "out"
    result = camfunc_cli("explain", *images["good"], "--method", "gradcam", "--method", "scorecam",
                         "--topk", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["gradcam", "scorecam"] and summary["failed"] == []
    assert summary["layer"] == [zoo.LAYER]
    assert [record["path"] for record in summary["images"]] == [str(p) for p in images["good"]]
    for record, (height, width) in zip(summary["images"], [(80, 96), (64, 64)]):
        assert len(record["classes"]) == 2
        probabilities = [c["probability"] for c in record["classes"]]
        assert probabilities[0] >= probabilities[1] and 0 < sum(probabilities) <= 1 + 1e-6
        for entry in record["classes"]:
            assert entry["name"] in zoo.CLASSES
            assert set(entry["files"]) == set(entry["overlays"]) == {"gradcam", "scorecam"}
            for file in entry["overlays"].values():
                assert png_size(file) == ("PNG", (width, height))  # drawn on the image as stored
            for file in entry["files"].values():  # figures worth showing: at least 256 px
                assert png_size(file)[0] == "PNG" and min(png_size(file)[1]) >= 200
                assert max(png_size(file)[1]) >= 256


def test_explain_goes_on_past_bad_images_and_says_so(images, tmp_path):
    out = tmp_path / "out"
    result = camfunc_cli("explain", images["corrupt"], images["good"][0], images["truncated"],
                         tmp_path / "missing.png", "--class", "circle", "--out", out)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("camfunc: error:")]
    assert len(errors) == 3
    assert "corrupt.png" in errors[0] and "truncated.png" in errors[1] and "missing.png" in errors[2]
    summary = json.loads((out / "summary.json").read_text())
    assert [f["path"] for f in summary["failed"]] == [str(images["corrupt"]), str(images["truncated"]),
                                                      str(tmp_path / "missing.png")]
    (record,) = summary["images"]
    assert record["classes"][0]["name"] == "circle"
    assert png_size(record["classes"][0]["files"]["gradcam"])[0] == "PNG"


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuchcam"], "unknown method 'nosuchcam'"),
    (["--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["--model", "torchvision:resnet999"], "unknown torchvision model 'resnet999'"),
    (["--weights", "missing-weights.pt"], "weights file not found: missing-weights.pt"),
    (["--layer", "block9"], "block9"),
    (["--class", "hexagon"], "unknown class 'hexagon'"),
])
def test_bad_arguments_get_one_clear_line_and_write_nothing(images, tmp_path, args, message):
    out = tmp_path / "out"
    result = camfunc_cli("explain", images["good"][0], *args, "--out", out, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camfunc: error:") and message in lines[0]
    assert not out.exists()


def test_a_corrupt_weights_file_is_named(images, tmp_path):
    weights = tmp_path / "bad.pt"
    weights.write_bytes(b"garbage")
    result = camfunc_cli("explain", images["good"][0], "--weights", weights, "--out", tmp_path / "o")
    assert result.returncode == 2 and "bad.pt" in result.stderr


def test_weights_that_do_not_fit_are_refused(images, tmp_path):
    weights = tmp_path / "other.pt"
    torch.save({"nosuch.weight": torch.zeros(3, 3)}, weights)
    result = camfunc_cli("explain", images["good"][0], "--weights", weights, "--out", tmp_path / "o")
    assert result.returncode == 2 and "do not fit the model" in result.stderr
    assert "1 unexpected key(s) (nosuch.weight)" in result.stderr
    assert "missing key(s) (" in result.stderr and "and " in result.stderr  # a few, then a count
    assert len(result.stderr.strip().splitlines()) == 1
    state = zoo.shapesnet(pretrained=False).state_dict()
    name = next(k for k, v in state.items() if v.ndim == 4)
    torch.save({**state, name: torch.zeros(1, 1, 1, 1)}, weights)  # the right keys, a wrong shape
    result = camfunc_cli("explain", images["good"][0], "--weights", weights, "--out", tmp_path / "o")
    assert result.returncode == 2 and f"size mismatch for {name}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_factory_model_in_the_working_directory_and_a_grayscale_one(images, tmp_path):
    (tmp_path / "mymodels_cwd.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def gray():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n\n"
        "def two():\n    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten())\n")
    result = camfunc_cli("explain", images["good"][1], "--model", "mymodels_cwd:gray", "--layer",
                         "1", "--size", "32", "--class", "2", "--out", tmp_path / "out",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # an RGB image, read as grayscale for it
    result = camfunc_cli("explain", images["good"][1], "--model", "mymodels_cwd:two",
                         "--out", tmp_path / "out2", cwd=tmp_path)
    assert result.returncode == 2
    assert "the model takes 2-channel images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_factory_model_with_the_layer_chosen_automatically(images, tmp_path):
    out = tmp_path / "out"
    env_path = str(__import__("pathlib").Path(__file__).parent)
    result = subprocess.run([sys.executable, "-m", "camfunc", "explain", str(images["good"][1]),
                             "--model", "helpers:small_cnn", "--size", "32", "--topk", "3",
                             "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == ["4"]  # the last spatial layer: the second ReLU
    classes = summary["images"][0]["classes"]
    assert [c["name"] for c in classes] == [str(c["class"]) for c in classes]
    assert len({c["class"] for c in classes}) == 3


def test_a_torchvision_model_by_name(images, tmp_path):
    out = tmp_path / "out"
    result = camfunc_cli("explain", images["good"][1], "--model", "torchvision:resnet18", "--size", "64",
                         "--layer", "layer4", "--class", "7", "--out", out)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((out / "summary.json").read_text())["images"][0]["classes"]
    assert entry["class"] == 7 and png_size(entry["overlays"]["gradcam"]) == ("PNG", (64, 64))


def test_demo_writes_figures_and_scores_and_prints_a_table(tmp_path):
    out = tmp_path / "demo"
    result = camfunc_cli("demo", "--out", out, "--scenes", "2", "--eval", "20",
                         "--method", "gradcam", "--method", "layercam")
    assert result.returncode == 0, result.stderr
    scores = json.loads((out / "scores.json").read_text())
    assert {"accuracy", "methods", "figures", "held_out_scenes", "chance_pointing_game_15px"} <= set(scores)
    assert 0 <= scores["accuracy"] <= 1 and 0 < scores["chance_pointing_game_15px"] < 1
    assert [row["method"] for row in scores["methods"]] == ["gradcam", "layercam"]
    for row in scores["methods"]:
        assert 0 <= row["pointing_game_15px"] <= 1 and 0 <= row["energy_pointing_game"] <= 1
    assert len(scores["figures"]) == 2
    for figure in scores["figures"]:
        kind, (width, height) = png_size(figure)
        assert kind == "PNG" and height >= 200  # panels shown at 256 px, not 64 px blown up
    # Each scene is also saved as itself, at the model's size, and explains without a warning.
    assert [png_size(scene) for scene in scores["scenes"]] == [("PNG", (64, 64))] * 2
    assert "gradcam" in result.stdout and "pointing_game_15px" in result.stdout
    explained = camfunc_cli("explain", scores["scenes"][0], "--out", tmp_path / "explained")
    assert explained.returncode == 0 and "warning" not in explained.stderr, explained.stderr


def test_demo_defaults_include_score_cam():
    from camfunc.cli._demo import DEMO_METHODS

    assert "scorecam" in DEMO_METHODS


def test_explain_warns_when_resizing_squashes_an_image(tmp_path):
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((220, 1760, 3), np.uint8)).save(strip)
    result = camfunc_cli("explain", strip, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "1760x220" in result.stderr and "squashed" in result.stderr


def test_evaluate_on_generated_scenes_writes_json_and_csv(tmp_path):
    out = tmp_path / "eval"
    result = camfunc_cli("evaluate", "--generated", "6", "--batch-size", "4", "--method", "gradcam",
                         "--method", "scorecam", "--step", "256", "--out", out)
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "metrics.json").read_text())
    assert [row["method"] for row in payload["summary"]] == ["gradcam", "scorecam"]
    assert len(payload["images"]) == 12
    columns = {"drop", "increase", "deletion_auc", "insertion_auc", "pointing_game_15px", "energy_pointing_game"}
    for row in payload["images"]:
        assert columns <= set(row)
        assert all(0 <= row[c] <= 1 for c in columns)
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["image", "method", "class"] and len(lines) == 13


def test_evaluate_image_files_records_failures(images, tmp_path):
    out = tmp_path / "eval"
    result = camfunc_cli("evaluate", *images["good"], images["corrupt"], "--metric", "confidence",
                         "--metric", "road", "--metric", "arcc", "--metric", "infidelity",
                         "--metric", "sensitivity", "--out", out)
    assert result.returncode == 1
    payload = json.loads((out / "metrics.json").read_text())
    assert [f["path"] for f in payload["failed"]] == [str(images["corrupt"])]
    assert len(payload["images"]) == 2
    for row in payload["images"]:
        assert {"road_logit_change", "arcc", "infidelity", "sensitivity_max"} <= set(row)
        assert math.isfinite(row["road_logit_change"]) and 0 <= row["arcc"] <= 1
        assert row["infidelity"] >= 0 and row["sensitivity_max"] >= 0


def test_evaluate_with_nothing_to_evaluate_says_so(tmp_path):
    result = camfunc_cli("evaluate", "--out", tmp_path / "e")
    assert result.returncode == 2 and "nothing to evaluate" in result.stderr and "not both" not in result.stderr


def test_evaluate_refuses_the_pointing_game_without_masks(images, tmp_path):
    result = camfunc_cli("evaluate", images["good"][0], "--metric", "pointing", "--out", tmp_path / "e")
    assert result.returncode == 2 and "needs object masks" in result.stderr


def test_zero_batch_size_and_out_of_range_class_are_one_line_errors(images, tmp_path):
    for command in (["explain", images["good"][0], "--batch-size", "0"],
                    ["evaluate", images["good"][0], "--class", "99"]):
        result = camfunc_cli(*command, "--out", tmp_path / "o")
        last = result.stderr.strip().splitlines()[-1]  # argparse prints its usage lines first
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "--batch-size: expected a positive integer, got 0" in last or \
            last.startswith("camfunc: error: gradcam:") and "99" in last
        assert not (tmp_path / "o").exists()


def test_random_metrics_do_not_depend_on_the_batch_size(tmp_path):
    payloads = []
    for batch in ("1", "3"):
        out = tmp_path / batch
        result = camfunc_cli("evaluate", "--generated", "3", "--batch-size", batch, "--metric", "road",
                             "--metric", "infidelity", "--out", out)
        assert result.returncode == 0, result.stderr
        payloads.append(json.loads((out / "metrics.json").read_text())["images"])
    for one, three in zip(*payloads):
        assert one["road_logit_change"] == pytest.approx(three["road_logit_change"], abs=1e-5)
        assert one["infidelity"] == pytest.approx(three["infidelity"], rel=1e-4, abs=1e-6)


def test_repeated_image_names_get_distinct_folders():
    from pathlib import Path

    from camfunc.cli._explain import unique_stems

    stems = unique_stems([Path("x/a.png"), Path("y/a.png"), Path("a-2.png"), Path("z/a.jpg")])
    assert len(set(stems)) == 4 and stems[0] == "a"


def test_the_console_script_is_declared_and_runs():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "camfunc"]
    assert script.value == "camfunc.cli:main"
    result = subprocess.run([sys.executable, "-c", "import sys; from camfunc.cli import main; "
                             "sys.exit(main(['--version']))"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("camfunc ")


def test_explain_draws_on_the_image_as_viewers_turn_it_unless_no_exif(tmp_path):
    path = tmp_path / "phone.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    Image.fromarray(np.full((40, 72, 3), 90, np.uint8)).save(path, exif=exif.tobytes())
    for extra, size in (([], (40, 72)), (["--no-exif"], (72, 40))):
        out = tmp_path / f"out{len(extra)}"
        result = camfunc_cli("explain", path, "--class", "circle", "--out", out, *extra)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        (file,) = summary["images"][0]["classes"][0]["overlays"].values()
        assert png_size(file) == ("PNG", size)


def test_explain_writes_what_the_python_api_computes(images, tmp_path):
    # Values, not only files: each overlay is the public overlay of the public method's map
    # for the image as read, and the scores are the model's, for the top classes.
    import camfunc
    from camfunc.viz import overlay

    path = images["good"][1]  # 64x64: the embedded model's own size, so no resizing
    result = camfunc_cli("explain", path, "--method", "gradcam", "--method", "layercam",
                         "--topk", "2", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["images"][0]
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)
    x = x.permute(2, 0, 1)[None]
    model = zoo.shapesnet()
    with torch.no_grad():
        scores = model(x)[0]
    top = scores.topk(2).indices.tolist()
    assert [entry["class"] for entry in record["classes"]] == top
    for k, entry in enumerate(record["classes"]):
        assert entry["score"] == pytest.approx(float(scores[top[k]]), abs=1e-5)
        assert entry["probability"] == pytest.approx(float(scores.softmax(0)[top[k]]), abs=1e-6)
        for name, file in entry["overlays"].items():
            cam = camfunc.METHODS[name](camfunc.split(model, zoo.LAYER), x, top[k])[0]
            want = np.asarray(overlay(x[0], cam))
            assert np.array_equal(np.asarray(Image.open(file).convert("RGB")), want), (name, k)
