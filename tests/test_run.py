"""camfunc.runs.run: dataset runs in shards, checked against direct computation, torchrun, resume.

The embedded network with random (seeded) weights stands in for a trained
model; images are generated scenes written as PNG files in ImageFolder layout.
References are computed here from the formulas (maps by calling the method on
the whole set at once, the drop and the pointing games written out by hand).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.testing import CompileCounterWithBackend

import camfunc
from camfunc import zoo
from camfunc.cli._run import main as run_main
from camfunc.runs import read_maps, read_shard, run as run_dataset

ATOL = 1e-5
NUM_IMAGES = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "shapesnet-random.pt"
    torch.manual_seed(1234)
    torch.save(zoo.shapesnet(pretrained=False).state_dict(), path)
    return path


def write_image_folder(root: Path, data: zoo.Scenes) -> Path:
    """Scenes as PNGs in ROOT/<class name>/scene-i.png."""
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / zoo.CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"scene-{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), zoo.scenes(NUM_IMAGES, seed=5))


def folder_contents(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) and their class indices in ImageFolder order, read independently."""
    images, classes = [], []
    for name in sorted(p.name for p in root.iterdir()):
        for file in sorted((root / name).iterdir()):
            pixels = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            classes.append(zoo.CLASSES.index(name))
    return torch.stack(images), torch.tensor(classes)


def model_and_split(weights: Path):
    model = zoo.shapesnet(weights=weights)
    return model, camfunc.split(model, zoo.LAYER)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], name: str, method: str | None = None) -> torch.Tensor:
    return torch.tensor([float(r[name]) for r in rows if method is None or r["method"] == method],
                        dtype=torch.float64)


def assert_same_results(a: Path, b: Path, methods: list[str]) -> None:
    """Maps and metric tables of two run folders equal to ATOL (the increase flag where decided)."""
    for method in methods:
        index_a, maps_a = read_maps(a, method)
        index_b, maps_b = read_maps(b, method)
        assert torch.equal(index_a, index_b)
        torch.testing.assert_close(maps_a, maps_b, atol=ATOL, rtol=0)
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert [(r["index"], r["method"], r["rank"], r["class"]) for r in rows_a] == \
        [(r["index"], r["method"], r["rank"], r["class"]) for r in rows_b]
    for name in ("score", "probability", "drop", "masked_probability"):
        torch.testing.assert_close(column(rows_a, name), column(rows_b, name), atol=ATOL, rtol=0)
    decided = (column(rows_a, "masked_probability") - column(rows_a, "probability")).abs() > ATOL
    assert torch.equal(column(rows_a, "increase")[decided], column(rows_b, "increase")[decided])


RUN_ARGS = dict(model="builtin", methods=["gradcam", "smooth_gradcampp"], classes="true",
                metrics=True, shard_size=6, map_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reference_run(folder, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_dataset(folder, out, weights=str(weights), batch_size=5, num_workers=2,
                         **RUN_ARGS)
    assert (result.images, result.failed, result.shards, result.written) == (NUM_IMAGES, 0, 3, 3)
    return out


def test_maps_and_confidence_metrics_match_direct_computation(reference_run, folder, weights):
    images, classes = folder_contents(folder)
    model, split = model_and_split(weights)
    indices, maps = read_maps(reference_run, "gradcam")
    assert torch.equal(indices, torch.arange(NUM_IMAGES))
    expected = camfunc.gradcam(split, images, classes)
    torch.testing.assert_close(maps[:, 0], expected, atol=ATOL, rtol=0)

    # Grad-CAM++ paper: Y, O softmax probabilities on x and on x * upsampled map.
    rows = [r for r in read_csv(reference_run / "metrics.csv") if r["method"] == "gradcam"]
    assert [int(r["class"]) for r in rows] == classes.tolist()
    with torch.no_grad():
        y = model(images).softmax(1).gather(1, classes[:, None])[:, 0].double()
        heat = F.interpolate(expected[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        o = model(images * heat).softmax(1).gather(1, classes[:, None])[:, 0].double()
    drop = (y - o).clamp_min(0) / y
    torch.testing.assert_close(column(rows, "probability"), y, atol=ATOL, rtol=0)
    torch.testing.assert_close(column(rows, "masked_probability"), o, atol=ATOL, rtol=0)
    torch.testing.assert_close(column(rows, "drop"), drop, atol=ATOL, rtol=0)
    decided = (o - y).abs() > ATOL
    assert torch.equal(column(rows, "increase")[decided], (o > y).double()[decided])

    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["failed"] == []
    assert manifest["versions"]["torch"] == torch.__version__
    assert [s["start"] for s in manifest["shards"]] == [0, 6, 12]
    index = read_csv(reference_run / "index.csv")
    assert [(int(r["shard"]), int(r["row"])) for r in index] == \
        [(i // 6, i % 6) for i in range(NUM_IMAGES)]


def test_shard_holds_indices_classes_scores_and_metric_columns(reference_run, folder, weights):
    shard = read_shard(reference_run / "shards" / "shard-000001.pt")
    assert shard["indices"].tolist() == list(range(6, 12))
    assert shard["maps"]["smooth_gradcampp"].shape == (6, 1, 16, 16)
    assert shard["maps"]["gradcam"].dtype == torch.float32
    _, classes = folder_contents(folder)
    assert torch.equal(shard["classes"][:, 0], classes[6:12])
    model, _ = model_and_split(weights)
    images, _ = folder_contents(folder)
    with torch.no_grad():
        logits = model(images[6:12]).gather(1, classes[6:12, None])
    torch.testing.assert_close(shard["scores"], logits, atol=ATOL, rtol=0)
    assert set(shard["metrics"]["gradcam"]) == {"drop", "increase", "masked_probability"}


def test_other_batch_size_gives_the_same_results(reference_run, folder, weights, tmp_path):
    run_dataset(folder, tmp_path / "out", weights=str(weights), batch_size=3, **RUN_ARGS)
    assert_same_results(reference_run, tmp_path / "out", RUN_ARGS["methods"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(data: Path | str, out: Path, weights: Path, batch_size: int,
             methods=("gradcam", "smooth_gradcampp"), classes: str = "true") -> list[str]:
    args = [str(data), "--out", str(out), "--weights", str(weights), "--classes", classes,
            "--metrics", "--shard-size", "6", "--map-dtype", "float32", "--no-progress",
            "--batch-size", str(batch_size)]
    for method in methods:
        args += ["--method", method]
    return args


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_torchrun_two_ranks_give_the_same_results(reference_run, folder, weights, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "camfunc", "run",
               *cli_args(folder, out, weights, batch_size=4)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["world_size"] == 2
    ranks = manifest["timing"]["ranks"]
    assert [r["shards"] for r in ranks] == [2, 1] and sum(r["images"] for r in ranks) == NUM_IMAGES
    assert_same_results(reference_run, out, RUN_ARGS["methods"])


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (out / "shards").glob("shard-*.pt")}


# Kills itself (SIGKILL) as it renames the named file into place: after the shards before it.
KILL_AT = """
import os, signal, sys
target, real_replace = sys.argv[1], os.replace

def replace(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
from camfunc.cli._run import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_run_resumes_to_the_same_results_without_rewriting_shards(weights, tmp_path):
    methods = ("gradcam", "randomcam")
    args = cli_args("scenes:16", tmp_path / "killed", weights, 4, methods, classes="top2")
    args[args.index("--shard-size") + 1] = "4"
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "shard-000002.pt", *args],
                            env=subprocess_env(), capture_output=True, timeout=300)
    assert killed.returncode == -9
    before = shard_files(tmp_path / "killed")
    assert sorted(before) == ["shard-000000.pt", "shard-000001.pt"]  # stopped after shard 1

    assert run_main(args) == 0  # the same arguments resume
    after = shard_files(tmp_path / "killed")
    assert len(after) == 4
    assert {name: after[name] for name in before} == before  # not rewritten
    assert not list((tmp_path / "killed").rglob("*.tmp"))
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["timing"]["images_this_call"] == 16 - 4 * len(before)

    whole = cli_args("scenes:16", tmp_path / "whole", weights, 4, methods, classes="top2")
    whole[whole.index("--shard-size") + 1] = "4"
    assert run_main(whole) == 0
    assert_same_results(tmp_path / "whole", tmp_path / "killed", list(methods))


def test_scenes_pointing_games_match_the_definitions(weights, tmp_path):
    run_dataset("scenes:12:3", tmp_path / "out", weights=str(weights), methods=["gradcam"],
                classes="true", metrics=True, shard_size=5, batch_size=4, map_dtype="float32",
                progress=False)
    data = zoo.scenes(12, seed=3)
    _, split = model_and_split(weights)
    heat = camfunc.upsample(camfunc.gradcam(split, data.images, data.labels), (64, 64))
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for i, row in enumerate(rows):
        peak = int(heat[i].flatten().argmax())
        py, px = divmod(peak, 64)
        distance = ((ys - py) ** 2 + (xs - px) ** 2).double().sqrt()[data.masks[i]].min()
        assert float(row["pointing_game"]) == float(distance < 15)
        energy = (heat[i] * data.masks[i]).sum() / heat[i].sum()
        assert abs(float(row["energy_pointing_game"]) - float(energy)) < ATOL


def test_compact_maps_decode_within_their_quantisation_step(reference_run, folder, weights,
                                                            tmp_path):
    exact = read_maps(reference_run, "gradcam")[1]
    for dtype, step in (("uint8", 0.5 / 255), ("float16", 2.0 ** -11)):
        args = {**RUN_ARGS, "map_dtype": dtype, "methods": ["gradcam"], "metrics": False}
        run_dataset(folder, tmp_path / dtype, weights=str(weights), batch_size=8, **args)
        shard = read_shard(tmp_path / dtype / "shards" / "shard-000000.pt")
        assert shard["maps"]["gradcam"].dtype == getattr(torch, dtype)
        assert float((read_maps(tmp_path / dtype, "gradcam")[1] - exact).abs().max()) <= step + ATOL


def test_upsample_stores_maps_at_the_input_resolution(weights, tmp_path):
    run_dataset("scenes:3", tmp_path / "out", weights=str(weights), upsample=True,
                map_dtype="float32", progress=False)
    _, maps = read_maps(tmp_path / "out", "gradcam")
    _, split = model_and_split(weights)
    data = zoo.scenes(3, seed=0)
    with torch.no_grad():
        predicted = split(data.images).argmax(1)
    expected = camfunc.upsample(camfunc.gradcam(split, data.images, predicted), (64, 64))
    torch.testing.assert_close(maps[:, 0], expected, atol=ATOL, rtol=0)


def test_compiled_run_compiles_once_despite_a_short_last_batch(weights, tmp_path):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    common = dict(weights=str(weights), methods=["gradcam"], classes="top2", shard_size=8,
                  batch_size=4, map_dtype="float32", progress=False)
    run_dataset("scenes:10", tmp_path / "compiled", compile=True, compile_backend=counter,
                **common)  # batches of 4, 4 | 2 (padded to 4)
    assert counter.frame_count == 1
    run_dataset("scenes:10", tmp_path / "eager", **common)
    for out in ("compiled", "eager"):
        assert read_maps(tmp_path / out, "gradcam")[1].shape == (10, 2, 16, 16)
    torch.testing.assert_close(read_maps(tmp_path / "compiled", "gradcam")[1],
                               read_maps(tmp_path / "eager", "gradcam")[1], atol=ATOL, rtol=0)


def test_corrupt_images_are_recorded_as_failed_and_the_run_goes_on(weights, tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", zoo.scenes(6, seed=2))
    good = sorted(root.rglob("*.png"))[0].read_bytes()
    for name in ("circle", "ring"):
        (root / name).mkdir(exist_ok=True)
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "ring" / "truncated.png").write_bytes(good[:60])
    status = run_main([str(root), "--out", str(tmp_path / "out"), "--weights", str(weights),
                       "--no-progress", "--shard-size", "4", "--workers", "1"])
    assert status == 1  # some images failed, the rest were explained
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    failed = {Path(f["name"]).name: f["reason"] for f in manifest["failed"]}
    assert set(failed) == {"broken.png", "truncated.png"}
    assert all(reason for reason in failed.values())
    assert manifest["images"] == 6
    index = read_csv(tmp_path / "out" / "index.csv")
    assert sorted(Path(r["name"]).name for r in index if r["status"] == "failed") == \
        ["broken.png", "truncated.png"]
    assert len(read_maps(tmp_path / "out", "gradcam")[0]) == 6
    assert "6 image(s) explained, 2 failed" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--method", "nosuchcam"], "unknown method 'nosuchcam'"),
    (["--classes", "best"], "classes must be 'true', 'predicted' or 'topK'"),
    (["--classes", "top9"], "more classes than the model's 5"),
    (["--shard-size", "0"], "shard_size must be a positive int"),
])
def test_bad_arguments_are_clear_errors(weights, tmp_path, capsys, args, message):
    status = run_main(["scenes:4", "--out", str(tmp_path / "out"), "--weights", str(weights),
                       *args])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_data_and_bad_specs_are_clear_errors(weights, tmp_path):
    with pytest.raises(ValueError, match="image folder not found"):
        run_dataset(tmp_path / "nowhere", tmp_path / "out", weights=str(weights))
    with pytest.raises(ValueError, match="bad scenes spec"):
        run_dataset("scenes:zero", tmp_path / "out", weights=str(weights))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class sub-folders"):
        run_dataset(tmp_path / "flat", tmp_path / "out", weights=str(weights))
    model = zoo.shapesnet(pretrained=False).train()
    with pytest.raises(ValueError, match="model.eval()"):
        run_dataset("scenes:2", tmp_path / "out", model=model)
    assert model.training  # unchanged


def test_resuming_with_other_settings_is_refused(weights, tmp_path):
    run_dataset("scenes:4", tmp_path / "out", weights=str(weights), progress=False)
    before = shard_files(tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):
        run_dataset("scenes:4", tmp_path / "out", weights=str(weights), methods=["gradcampp"],
                    progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_dataset("scenes:4:1", tmp_path / "out", weights=str(weights), progress=False)
    assert shard_files(tmp_path / "out") == before
    # Batch size is not a setting of the results: this resumes (nothing left to do).
    result = run_dataset("scenes:4", tmp_path / "out", weights=str(weights), batch_size=3,
                         progress=False)
    assert (result.written, result.skipped) == (0, 1)
    assert shard_files(tmp_path / "out") == before
    assert "nothing left to compute" in str(result) and "img/s" not in str(result)


def test_a_module_model_is_used_as_given_and_never_moved_or_changed(tmp_path):
    torch.manual_seed(0)
    model = zoo.shapesnet(pretrained=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    run_dataset("scenes:4", tmp_path / "out", model=model, layer=zoo.LAYER, size=64, mean=mean,
                std=std, map_dtype="float32", progress=False)
    data = zoo.scenes(4, seed=0)
    x = (data.images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    expected = camfunc.gradcam(camfunc.split(model, zoo.LAYER), x, predicted)
    torch.testing.assert_close(read_maps(tmp_path / "out", "gradcam")[1][:, 0], expected,
                               atol=ATOL, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sscam_draws_per_image_so_results_do_not_depend_on_the_batch(weights, tmp_path):
    common = dict(model="builtin", weights=str(weights), methods=["sscam"], classes="true",
                  map_dtype="float32", progress=False)
    run_dataset("scenes:3", tmp_path / "one", batch_size=1, **common)
    run_dataset("scenes:3", tmp_path / "three", batch_size=3, **common)
    _, one = read_maps(tmp_path / "one", "sscam")
    _, three = read_maps(tmp_path / "three", "sscam")
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)
    assert one.flatten(1).std(1).min() > 0  # real maps, not flat zeros


def test_a_negative_batch_size_is_refused_by_the_parser(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(["scenes:4", "--out", str(tmp_path / "out"), "--batch-size", "-2"])
    assert stop.value.code == 2
    assert "--batch-size: expected a positive integer, got -2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_read_maps_refuses_an_unfinished_run(weights, tmp_path):
    out = tmp_path / "out"
    run_dataset("scenes:4", out, weights=str(weights), shard_size=2, progress=False)
    assert read_maps(out, "gradcam")[1].shape[0] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(ValueError, match="has not finished"):
        read_maps(out, "gradcam")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shards" / "shard-000001.pt").unlink()
    with pytest.raises(ValueError, match="holds 1 shard files but its run wrote 2"):
        read_maps(out, "gradcam")


def test_a_failing_rank_stops_the_others_instead_of_leaving_them_waiting(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "camfunc", "run",
               "scenes:8", "--out", str(out), "--model", "rank_failing:model", "--size", "16",
               "--layer", "net.4", "--shard-size", "2", "--batch-size", "2", "--no-progress"]
    env = {**subprocess_env(), "PYTHONPATH": str(Path(__file__).parent)}
    # Without the error exchange rank 0 would wait in the final gather for the backend's
    # 30-minute timeout; the subprocess timeout would then fail this test.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "rank 1 broke on purpose" in done.stderr
    assert "the run failed on another rank: rank 1" in done.stderr


def test_loader_ships_uint8_and_the_device_sees_the_same_floats(tmp_path):
    # Workers send a quarter of float32's bytes; the model must see exactly the pixels it
    # would have seen as floats, for every byte value.
    from camfunc._util.images import read_resized, read_resized_bytes, unit_float

    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    path = tmp_path / "all-values.png"
    Image.fromarray(pixels).save(path)
    shipped = read_resized_bytes(path, (16, 16))
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 16, 16)
    assert torch.equal(unit_float(shipped), read_resized(path, (16, 16)))
    assert torch.equal(unit_float(shipped), torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
