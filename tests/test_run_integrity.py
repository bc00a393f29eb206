"""Runs that cannot go silently wrong: shard digests, every guard of a resume, temporary
files after a kill inside each write, and one writer per folder.

Kills are deterministic: a child process runs the command line with ``os.replace``
wrapped so that it kills itself (SIGKILL) just before renaming a chosen file into place,
that is, inside that file's write. Each guard is also checked to be load-bearing: the
test that covers it fails when it is turned off (see the docstrings).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_run import KILL_AT, assert_same_results, shard_files, subprocess_env

import camfunc
from camfunc.cli._run import main as run_main
from camfunc.runs import read_maps, read_shard, run as run_dataset

ARGS = ["scenes:8", "--method", "gradcam", "--classes", "top2", "--metrics",
        "--shard-size", "3", "--batch-size", "3", "--map-dtype", "float32", "--no-progress"]


def cli(out: Path, *extra: str) -> list[str]:
    return [*ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "out"
    assert run_main(cli(out)) == 0
    return out


def flip_bytes_in_tensor_data(path: Path) -> None:
    """Eight bytes inverted inside the maps' storage (the payload still loads)."""
    shard = read_shard(path, verify=False)
    maps = shard["maps"]["gradcam"].contiguous()
    needle = maps.reshape(-1).view(torch.uint8).numpy().tobytes()[:64]
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0, "the maps' bytes were not found in the file"
    data[at + 16:at + 24] = bytes(b ^ 0xFF for b in data[at + 16:at + 24])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_on_read_and_recomputed_on_resume(whole, tmp_path, capsys):
    """Turning off the digest comparison (``verified``) fails this test."""
    out = tmp_path / "out"
    assert run_main(cli(out)) == 0
    damaged = out / "shards" / "shard-000001.pt"
    flip_bytes_in_tensor_data(damaged)
    torch.load(damaged, weights_only=True)  # it still loads: only the digest tells
    with pytest.raises(ValueError, match=r"shard-000001\.pt is damaged: its content hashes to"):
        read_shard(damaged)
    with pytest.raises(ValueError, match=r"shard-000001\.pt is damaged"):
        read_maps(out, "gradcam")
    read_maps(out, "gradcam", verify=False)  # skipping the check reads what is there
    kept = shard_files(out)
    capsys.readouterr()
    assert run_main(cli(out)) == 0
    assert "recomputing shard 1: " in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["shard"] for entry in manifest["recomputed"]] == [1]
    assert "is damaged" in manifest["recomputed"][0]["reason"]
    assert manifest["timing"]["images_this_call"] == 3
    now = shard_files(out)
    assert now["shard-000001.pt"] != kept["shard-000001.pt"]
    assert {k: v for k, v in now.items() if k != "shard-000001.pt"} == \
        {k: v for k, v in kept.items() if k != "shard-000001.pt"}
    assert_same_results(whole, out, ["gradcam"])


def test_the_manifest_records_each_shards_digest_and_read_maps_checks_it(tmp_path):
    """Turning off read_maps' comparison with the manifest's digests fails this test."""
    out = tmp_path / "out"
    assert run_main(cli(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    digests = [entry["digest"] for entry in manifest["shards"]]
    assert len(set(digests)) == 3 and all(len(d) == 32 for d in digests)
    assert [read_shard(out / e["file"])["digest"] for e in manifest["shards"]] == digests
    # A whole, valid shard in another's place (its own digest holds): the manifest tells.
    first, second = out / "shards" / "shard-000000.pt", out / "shards" / "shard-000001.pt"
    first.write_bytes(second.read_bytes())
    with pytest.raises(ValueError, match=r"shard-000000\.pt is not the shard .* recorded"):
        read_maps(out, "gradcam")


def test_a_digest_covers_every_value_not_only_the_maps(tmp_path):
    from camfunc.runs._shards import content_digest

    payload = {"maps": {"gradcam": torch.zeros(2, 1, 3, 3)}, "indices": torch.tensor([4, 5]),
               "start": 3, "failed": [{"index": 1, "reason": "x"}]}
    base = content_digest(payload)
    assert content_digest({**payload, "start": 4}) != base
    assert content_digest({**payload, "indices": torch.tensor([4, 6])}) != base
    assert content_digest({**payload, "indices": torch.tensor([4, 5], dtype=torch.int32)}) != base
    assert content_digest({**payload, "maps": {"gradcam": torch.zeros(2, 1, 9)}}) != base
    assert content_digest({**payload, "failed": [{"index": 1, "reason": "y"}]}) != base
    assert content_digest(dict(reversed(payload.items()))) == base  # key order is not content


def test_a_resume_without_the_manifest_over_shards_of_other_settings_is_refused(tmp_path):
    """The shards' own fingerprint is the only guard once manifest.json is gone; turning
    off that comparison (in ``survey_shards``) fails this test."""
    out = tmp_path / "out"
    assert run_main(cli(out)) == 0
    (out / "manifest.json").unlink()
    before = shard_files(out)
    with pytest.raises(ValueError, match=r"shard-000000\.pt was written with other settings"):
        run_dataset("scenes:8", out, methods=["gradcampp"], classes="top2", shard_size=3,
                    progress=False)
    assert shard_files(out) == before
    assert run_main(cli(out)) == 0  # the same settings resume, with nothing left to compute
    assert shard_files(out) == before


def test_a_resume_over_a_manifest_of_other_settings_is_refused(tmp_path):
    """Turning off the manifest's fingerprint comparison (``check_folder``) fails this test:
    the shards alone cannot tell when none was finished."""
    out = tmp_path / "out"
    assert run_main(cli(out)) == 0
    for shard in (out / "shards").glob("*.pt"):
        shard.unlink()
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run_dataset("scenes:8", out, methods=["gradcampp"], shard_size=3, progress=False)


def test_read_maps_refuses_a_shard_of_other_settings(tmp_path):
    """Turning off read_maps' fingerprint comparison fails this test."""
    for name, method in (("a", "gradcam"), ("b", "gradcampp")):
        run_dataset("scenes:4", tmp_path / name, methods=[method], shard_size=2, progress=False)
    (tmp_path / "a" / "shards" / "shard-000001.pt").write_bytes(
        (tmp_path / "b" / "shards" / "shard-000001.pt").read_bytes())
    with pytest.raises(ValueError, match=r"shard-000001\.pt was written with other settings"):
        read_maps(tmp_path / "a", "gradcam")




@pytest.mark.parametrize("target", ["manifest.json", "shard-000001.pt", "index.csv",
                                    "metrics.csv"])
def test_no_temporary_file_survives_a_kill_inside_any_write(whole, tmp_path, target):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_AT, target, *cli(out)],
                            env=subprocess_env(), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.rglob("*.tmp"))
    assert any(name.startswith(f".{target}.") for name in left), left  # killed inside it
    assert run_main(cli(out)) == 0
    assert not list(out.rglob("*.tmp"))
    assert_same_results(whole, out, ["gradcam"])


BLOCKING_RUN = """
import sys, time
from pathlib import Path
import camfunc.runs._job as job

release = Path(sys.argv[1])
real_add_batch = job.add_batch

def add_batch(*args, **kwargs):  # holds the run inside its shard loop until told to go on
    while not release.exists():
        time.sleep(0.02)
    return real_add_batch(*args, **kwargs)

job.add_batch = add_batch
from camfunc.cli._run import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(whole, tmp_path):
    """Not taking the lock (``FolderLock.acquire`` returning None) fails this test."""
    out, release = tmp_path / "out", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", BLOCKING_RUN, str(release), *cli(out)],
                             env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock = out / ".camfunc-run.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and str(first.pid) in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with pytest.raises(ValueError, match=rf"is being written by another camfunc run \(pid "
                                             rf"{first.pid} on .*wait for it to finish"):
            run_dataset("scenes:8", out, methods=["gradcam"], classes="top2", metrics=True,
                        shard_size=3, batch_size=3, map_dtype="float32", progress=False)
        assert not list((out / "shards").glob("*.pt"))  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert run_main(cli(out)) == 0  # the killed run's lock is no lock
    assert str(os.getpid()) in lock.read_text()
    assert_same_results(whole, out, ["gradcam"])


def test_the_lock_is_released_when_a_run_ends_and_when_it_fails(tmp_path):
    out = tmp_path / "out"
    camfunc.runs.run("scenes:2", out, progress=False)
    camfunc.runs.run("scenes:2", out, progress=False)  # the first run let go
    with pytest.raises(ValueError, match="other settings"):
        camfunc.runs.run("scenes:2", out, methods=["gradcampp"], progress=False)
    camfunc.runs.run("scenes:2", out, progress=False)  # so did the refused one
