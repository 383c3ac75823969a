"""Remote pools, read for real: WebDataset shards over HTTP from a server on 127.0.0.1 (one
connection dropped part-way, retried), through ``pipe:cat``, from a local S3 endpoint (moto's
server) and a file list at a URL; each labels and selects exactly as the local copy does. A shard
that keeps failing stops labeling with one line naming it, and the next run resumes there. A
whole ``noisystudent run`` over an HTTP pool completes, resumes after a kill -9 in label-1, and
selects what the run over the local shards selects. An empty or non-tar pool is a one-line error."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
from PIL import Image

from noisystudent.data.datasets import load_digits_arrays
from noisystudent.data.pool import ShardReadError, path_source
from noisystudent.data.transforms import eval_transform
from noisystudent.label.inference import label_to_store
from noisystudent.label.select import select_from_store
from noisystudent.runtime.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from _remote_servers import ShardServer, s3_server, upload_to_s3  # noqa: E402
from _tiny import tiny  # noqa: E402

SHARDS, PER_SHARD = 4, 40


def write_shards(root: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, offset: int = 0) -> Path:
    """Digits as PNG samples (``<key>.png`` + ``<key>.cls``) in ``pool-0000.tar`` ...; also each image
    as a file with a ``list.txt`` naming them relatively (a file-list pool of the same images)."""
    images, _, _ = load_digits_arrays()
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(shards):
        with tarfile.open(root / f"pool-{s:04d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                buf = io.BytesIO()
                Image.fromarray(images[offset + i]).save(buf, format="PNG")
                for name, data in ((f"d{i:05d}.png", buf.getvalue()), (f"d{i:05d}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                (root / "img").mkdir(exist_ok=True)
                (root / "img" / f"d{i:05d}.png").write_bytes(buf.getvalue())
                lines.append(f"img/d{i:05d}.png\n")
    (root / "list.txt").write_text("".join(lines))
    return root


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def label(pool: str, out: Path, workers: int = 0, ctx=None):
    """Label ``pool`` (a data.unlabeled string) into ``out/store``; select into ``out/sel``."""
    source = path_source(pool, shard_size=32)
    label_to_store(_model(), source, out / "store", transform=eval_transform(8, 1, (0.5,), (0.25,)),
                   num_classes=10, teacher="t", device="cpu", num_workers=workers, precision="fp32",
                   progress=False, ctx=ctx)
    if ctx is not None:
        return None
    selection = select_from_store(out / "store", out / "sel" / "selection.parquet", threshold=0.0, per_class=5)
    return pq.read_table(out / "store" / "shards").sort_by("key"), selection


def assert_same(a, b) -> None:
    (ta, sa), (tb, sb) = a, b
    assert ta.num_rows == tb.num_rows > 0
    for column in ("key", "topk_class", "topk_prob", "index"):
        assert ta.column(column).equals(tb.column(column)), column
    keys = [pq.read_table(s.path, columns=["key"]).column(0).to_pylist() for s in (sa, sb)]
    assert keys[0] == keys[1] and len(keys[0]) > 0 and sa.num_selected == sb.num_selected


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def local(shards, tmp_path_factory):
    return label(str(shards / f"pool-{{0000..{SHARDS - 1:04d}}}.tar"), tmp_path_factory.mktemp("local"))


def test_http_shards_label_as_local_ones_and_a_dropped_connection_is_retried(shards, local, tmp_path):
    with ShardServer(shards) as server:
        server.drop["pool-0001.tar"] = 1  # the first GET of shard 1 stops half-way
        remote = label(f"{server.url}/pool-{{0000..{SHARDS - 1:04d}}}.tar", tmp_path, workers=2)
        assert server.gets["pool-0001.tar"] == 2 and server.gets["pool-0002.tar"] == 1
    assert_same(local, remote)
    assert (tmp_path / "store" / "source" / "shards.txt").read_text().splitlines()[1] == \
        f"{server.url}/pool-0001.tar"  # the listing is frozen beside the store


def test_pipe_shards_label_as_local_ones(shards, local, tmp_path):
    assert_same(local, label(f"pipe:cat {shards}/pool-{{0000..{SHARDS - 1:04d}}}.tar", tmp_path / "cat"))
    # compressed on the way: told by its magic bytes and read through gzip
    assert_same(local, label(f"pipe:gzip -c {shards}/pool-{{0000..{SHARDS - 1:04d}}}.tar", tmp_path / "gzip"))


def test_s3_shards_from_a_local_endpoint_label_as_local_ones(shards, local, tmp_path, monkeypatch):
    with s3_server(monkeypatch) as endpoint:
        upload_to_s3(endpoint, shards, "pool", "pool-*.tar")
        assert_same(local, label(f"s3://pool/pool-{{0000..{SHARDS - 1:04d}}}.tar", tmp_path))


@pytest.mark.slow
def test_under_torchrun_each_rank_streams_only_its_own_shards(shards, local, tmp_path):
    from _tiny import torchrun

    with ShardServer(shards) as server:
        torchrun(__file__, "label", f"{server.url}/pool-{{0000..{SHARDS - 1:04d}}}.tar", str(tmp_path))
        assert dict(server.gets) == {f"pool-{s:04d}.tar": 1 for s in range(SHARDS)}  # each read once, by one rank
    two = pq.read_table(tmp_path / "store" / "shards").sort_by("key")
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["run"]["world_size"] == 2
    assert two.column("key").equals(local[0].column("key"))
    assert two.column("topk_class").equals(local[0].column("topk_class"))
    np.testing.assert_allclose(two.column("confidence").to_numpy(), local[0].column("confidence").to_numpy(), rtol=1e-5)


def test_a_file_list_at_a_url_labels_as_the_local_list(shards, tmp_path):
    with ShardServer(shards) as server:
        remote = label(f"{server.url}/list.txt", tmp_path / "remote")
        assert server.gets["list.txt"] == 1 and server.gets["img/d00003.png"] == 1
    listed = label(str(shards / "list.txt"), tmp_path / "local")
    assert_same(listed, remote)
    assert (tmp_path / "remote" / "store" / "source" / "files.txt").read_text() == (shards / "list.txt").read_text()


def test_a_shard_that_keeps_failing_stops_with_its_name_and_the_next_run_resumes(shards, local, tmp_path):
    pattern = "/pool-{0000..%04d}.tar" % (SHARDS - 1)
    with ShardServer(shards) as server:
        server.drop["pool-0002.tar"] = 100  # every GET drops
        with pytest.raises(ShardReadError, match=r"pool-0002\.tar could not be read \(failed 4 times") as info:
            label(server.url + pattern, tmp_path)
        assert "\n" not in str(info.value) and server.gets["pool-0002.tar"] == 4
        done = sorted((tmp_path / "store" / "done").glob("part-*.json"))
        assert len(done) == 2  # shards 0 and 1 (one worker: in order), kept for the next run
        stamps = {p.name: p.stat().st_mtime_ns for p in done}
        server.drop.clear()
        resumed = label(server.url + pattern, tmp_path)
        assert server.gets["pool-0000.tar"] == 1 and server.gets["pool-0003.tar"] == 1  # not read again
    assert all((tmp_path / "store" / "done" / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert_same(local, resumed)


def test_an_empty_or_non_tar_webdataset_pool_is_a_one_line_error(tmp_path):
    (tmp_path / "pool-0000.tar").write_bytes(b"these are not the bytes of a tar archive" * 40)
    with tarfile.open(tmp_path / "pool-0001.tar", "w"):
        pass  # an empty tar: no members at all
    with pytest.raises(DataError, match="no readable images in its 2 shard") as info:
        label(str(tmp_path / "pool-{0000..0001}.tar"), tmp_path)
    assert "\n" not in str(info.value) and "corrupt tar" in str(info.value)
    with tarfile.open(tmp_path / "pool-0000.tar", "w"):
        pass
    with pytest.raises(DataError, match="no readable images in its 1 shard.*hold no items"):
        label(str(tmp_path / "pool-{0000..0000}.tar"), tmp_path / "empty")


def test_remote_pool_mistakes_are_one_line_errors(tmp_path, capsys):
    with ShardServer(tmp_path) as server:
        for pool, message in ((f"{server.url}/missing-{{0000..0001}}.tar", "WebDataset shard not found"),
                              (f"{server.url}/pool", "a remote pool is WebDataset shards"),
                              ("nosuchprotocol://bucket/pool-{0000..0001}.tar", "cannot read")):
            with pytest.raises(DataError, match=message) as info:
                path_source(pool).prepare(tmp_path / "work")
            assert "\n" not in str(info.value)


# ------------------------------------------------------------------ whole runs through the CLI

RUN = tiny("teacher.epochs=2", "data.max_unlabeled=null", "pseudo.shard_size=256", "students=[{model: ns_cnn_s}]",
           "evaluate.suites=[clean]", "device=cpu")


def _run(out: Path, pool: str, *extra: str, resume: bool = False, wait=True):
    args = ["--resume", str(out)] if resume else \
        ["--out", str(out), *sum((["--set", s] for s in RUN + [f"data.unlabeled={pool}", *extra]), [])]
    command = [sys.executable, "-m", "noisystudent", "run", *args, "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _selected(run: Path) -> list[str]:
    return pq.read_table(run / "select-1" / "selection.parquet", columns=["key"]).column(0).to_pylist()


PATTERN = "/pool-{0000..0003}.tar"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """Digits plus a 4-shard WebDataset pool read from local disk: the run the remote ones must equal."""
    root = tmp_path_factory.mktemp("reference")
    shards = write_shards(root / "shards", per_shard=50, offset=1500)
    ref = _run(root / "ref", str(shards) + PATTERN)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return shards, root / "ref"


@pytest.mark.slow
def test_run_over_http_completes_resumes_after_kill_and_selects_as_local(reference_run, tmp_path):
    """The reference pool on a loopback HTTP server; shard 2 is held back until the run has been
    killed (-9) in label-1, so the kill lands there every time."""
    shards, ref_dir = reference_run
    pattern = PATTERN
    with ShardServer(shards) as server:
        server.hold["pool-0002.tar"] = gate = threading.Event()
        run = tmp_path / "run"
        proc = _run(run, server.url + pattern, wait=False)
        done = run / "label-1" / "done"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and \
                not (server.gets["pool-0002.tar"] and done.is_dir() and len(list(done.glob("part-*.json"))) >= 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gate.set()
        kept = sorted(done.glob("part-*.json"))
        total = json.loads((ref_dir / "label-1" / "manifest.json").read_text())["num_shards"]
        assert 2 <= len(kept) < total, "the kill did not land inside label-1"
        stamps = {p.name: p.stat().st_mtime_ns for p in kept}
        resumed = _run(run, "", resume=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all((done / n).stat().st_mtime_ns == t for n, t in stamps.items())  # not labeled again
    assert (run / "pool" / "part-1" / "shards.txt").read_text().splitlines()[0] == server.url + "/pool-0000.tar"
    assert _selected(run) == _selected(ref_dir) and any(k.startswith("pool-0002/") for k in _selected(run))
    a, b = (json.loads((d / "summary.json").read_text())["stages"] for d in (ref_dir, run))
    assert [(s["name"], s["num_pseudo"]) for s in a] == [(s["name"], s["num_pseudo"]) for s in b]


@pytest.mark.slow
def test_runs_over_pipe_and_s3_select_as_local(reference_run, tmp_path, monkeypatch):
    """The reference pool through ``pipe:cat`` and from moto's S3 server on 127.0.0.1 (reached by
    the run's process through FSSPEC_S3_ENDPOINT_URL, as a user would); the reference run's
    teacher labels, so the selections must be the reference's."""
    shards, ref_dir = reference_run
    teacher = [f"teacher.pretrained={ref_dir / 'teacher' / 'model.pt'}", "teacher.epochs=0"]
    with s3_server(monkeypatch) as endpoint:
        upload_to_s3(endpoint, shards, "run-pool", "pool-*.tar")
        for name, pool in (("pipe", f"pipe:cat {shards}{PATTERN}"), ("s3", f"s3://run-pool{PATTERN}")):
            proc = _run(tmp_path / name, pool, *teacher)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert (tmp_path / name / "summary.json").is_file()
            assert _selected(tmp_path / name) == _selected(ref_dir), name


@pytest.mark.slow
def test_a_run_over_an_empty_or_non_tar_webdataset_pool_stops_with_one_line(tmp_path):
    """Issue 27: such a pool used to finish with exit 0 and "0 images labeled"; like a folder
    without images it is now refused, in one line naming what was read."""
    (tmp_path / "pool-0000.tar").write_bytes(b"<html>not found</html>")  # what a bad download leaves
    with tarfile.open(tmp_path / "pool-0001.tar", "w"):
        pass  # an empty tar
    # labels_per_class=null: no digits move to the pool, which is then the tars alone
    proc = _run(tmp_path / "run", str(tmp_path / "pool-{0000..0001}.tar"), "data.labels_per_class=null",
                "teacher.epochs=1")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "no readable images in its 2 shard(s)" in err[0] and "pool-0000/<rest of shard>" in err[0]
    assert "corrupt tar" in err[0] and "bad_images.tsv" in err[0]
    assert not (tmp_path / "run" / "summary.json").exists()


if __name__ == "__main__":  # ``label POOL OUT`` under torchrun: each rank labels its share
    from noisystudent.runtime.distributed import cleanup, init_distributed

    _ctx = init_distributed("cpu")
    label(sys.argv[2], Path(sys.argv[3]), workers=1, ctx=_ctx)
    cleanup(_ctx)
