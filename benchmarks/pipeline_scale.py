"""Peak memory of the whole ``noisystudent run`` does not grow with the unlabeled pool.

Writes a tiny labeled image-folder dataset (3 classes, 8 px RGB, one dominant colour per class)
and, per case, an unlabeled pool of the same kind of images: WebDataset tar shards (10^4, 10^5,
10^6 images by default) and a folder of PNGs in sub-folders of 1,000 (10^4, 10^5). Each case runs
the real ``noisystudent run`` (``cli.main``: teacher, label-1, select-1, student-1, evaluate,
report) in a fresh subprocess with ``data.unlabeled=<the pool>``, one torch thread and one
DataLoader worker.

The student trains from the whole selection (``pseudo.per_class = N // 3``, so the balanced
selection is about the whole pool and the student's dataset is built over all of it) but for the
same number of steps at every size (``train.epochs`` is set to ``steps / steps_per_epoch``), so
the peak memory compares like with like.

Memory, measured in the subprocess that runs ``noisystudent run``:

- ``peak_rss_mb``: ``getrusage(RUSAGE_SELF).ru_maxrss`` (exact peak of the main process);
- ``worker_peak_rss_mb``: ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest peak of any
  finished child (the DataLoader workers of labeling, training and evaluation);
- ``stage_rss_mb``: per stage, the peak RSS of the main process and of its live children, from
  ``/proc`` polled every 20 ms (the stage boundaries come from wrapping ``StageRunner.stage``,
  which only observes: every stage runs as in any run).

Times: per stage from the same wrapper; labeling img/s from ``label-1/manifest.json`` (``run``);
student img/s from ``student-1/metrics.json`` (``images_seen / seconds``).

    python benchmarks/pipeline_scale.py             # wds 1e4, 1e5, 1e6 + folder 1e4, 1e5 (18 min on a loaded 2-core machine)
    python benchmarks/pipeline_scale.py --quick     # wds and folder at 1e3 and 1e4 (a few minutes)

The last line printed is a JSON object; ``rss_ratio`` is the largest over the smallest main
process peak RSS of all cases (target <= 1.15), ``worker_rss_ratio`` the same for the workers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CLASSES = ("a", "b", "c")
SIZE = 8
BANK = 4096  # distinct encoded images per class; pool item i reuses bank[i % BANK] (keys are unique)
POLL_S = 0.02


# ------------------------------------------------------------------------------ the data


def _image(rng: np.random.Generator, c: int) -> np.ndarray:
    arr = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
    arr[..., c] += 150  # each class is one dominant colour: a teacher learns it in a few steps
    return arr


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_labeled(root: Path, train: int = 40, test: int = 20) -> None:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / name / f"{i}.png").write_bytes(_png(_image(rng, c)))


def _bank(seed: int = 1) -> list[bytes]:
    """Encoded pool images, classes interleaved; encoding 10^6 PNGs would dominate the set-up."""
    rng = np.random.default_rng(seed)
    return [_png(_image(rng, i % len(CLASSES))) for i in range(BANK)]


def write_webdataset(root: Path, n: int, per_tar: int) -> str:
    """``n`` images as WebDataset tars of ``per_tar`` samples; returns the brace pattern."""
    bank = _bank()
    root.mkdir(parents=True, exist_ok=True)
    tars = -(-n // per_tar)
    for t in range(tars):
        with tarfile.open(root / f"pool-{t:06d}.tar", "w") as tar:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                data = bank[i % BANK]
                info = tarfile.TarInfo(f"{i:09d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root / f"pool-{{000000..{tars - 1:06d}}}.tar")


def write_folder(root: Path, n: int, per_dir: int = 1000) -> str:
    """``n`` PNG files in sub-folders of ``per_dir``; returns the folder."""
    bank = _bank()
    for i in range(n):
        sub = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:09d}.png").write_bytes(bank[i % BANK])
    return str(root)


def overrides(data: Path, pool: str, n: int, args) -> list[str]:
    """The run's config: tiny model and data, the pool, a student trained for ``args.steps`` steps
    over a selection of about the whole pool."""
    per_class = max(1, n // len(CLASSES))
    unl_batch = round(args.batch_size * args.ratio)
    labeled = len(CLASSES) * (40 - args.val_per_class)
    per_epoch = max(math.ceil(labeled / args.batch_size), math.ceil(per_class * len(CLASSES) / unl_batch))
    epochs = (args.steps - 0.5) / per_epoch  # ceil(epochs * per_epoch) == steps, whatever the float rounding
    return ["data.source=image-folder", f"data.train_dir={data / 'train'}", f"data.test_dir={data / 'test'}",
            f"data.unlabeled={pool}", "data.labels_per_class=null", f"data.val_per_class={args.val_per_class}",
            f"data.image_size={SIZE}", "data.channels=3", f"data.num_workers={args.workers}",
            f"teacher.epochs={args.teacher_epochs}", f"students=[{{model: {args.model}, epochs: {epochs:.12f}}}]",
            f"teacher.model={args.model}", f"train.batch_size={args.batch_size}",
            f"train.unlabeled_ratio={args.ratio}", "train.precision=fp32", "train.checkpoint_every=0",
            f"pseudo.per_class={per_class}", "pseudo.threshold=0.3", f"pseudo.shard_size={args.shard_size}",
            f"pseudo.batch_size={args.label_batch}", "pseudo.precision=fp32", "evaluate.suites=[clean]"]


# ------------------------------------------------------------------------------ the child


def _rss_kb(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[str]:
    kids: list[str] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += f.read().split()
    except OSError:
        pass
    return kids


class StagePoller:
    """Peak RSS of this process and of its live children, per stage (polled from /proc)."""

    def __init__(self):
        self.stage = "setup"
        self.peaks: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            main = _rss_kb(me)
            kids = max((_rss_kb(k) for k in _children(me)), default=0)
            p = self.peaks.setdefault(self.stage, {"main": 0, "workers": 0})
            p["main"], p["workers"] = max(p["main"], main), max(p["workers"], kids)
            self._stop.wait(POLL_S)

    def wrap_stages(self) -> None:
        """Observe ``StageRunner.stage``: name each stage's samples and time it."""
        from noisystudent.runtime.runner import StageRunner

        original, poller = StageRunner.stage, self

        def stage(runner, name, work, load, **how):
            poller.stage, start = name, time.perf_counter()
            try:
                return original(runner, name, work, load, **how)
            finally:
                poller.seconds[name] = round(time.perf_counter() - start, 2)
                poller.stage = f"after {name}"

        StageRunner.stage = stage

    def __enter__(self) -> "StagePoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(run_dir: Path, sets: list[str]) -> dict:
    from noisystudent import cli

    poller = StagePoller()
    poller.wrap_stages()
    start = time.perf_counter()
    with poller:
        code = cli.main(["run", "--out", str(run_dir), "--quiet", *sum((["--set", s] for s in sets), [])])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"noisystudent run exited with {code}")
    summary = json.loads((run_dir / "summary.json").read_text())
    label = json.loads((run_dir / "label-1" / "manifest.json").read_text())["run"]
    selection = json.loads((run_dir / "select-1" / "selection.json").read_text())
    student = json.loads((run_dir / "student-1" / "metrics.json").read_text())
    teacher = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731 - ru_maxrss and statm are in KiB here
    return {
        "peak_rss_mb": mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "worker_peak_rss_mb": mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
        "stage_rss_mb": {s: {"main": mb(p["main"]), "workers": mb(p["workers"])} for s, p in poller.peaks.items()},
        "stage_seconds": poller.seconds, "wall_s": round(wall, 1),
        "label_img_s": label["images_per_s"], "label_seconds": label["seconds"], "labeled": label["images_labeled"],
        "selected": selection["num_selected"], "unique": selection["num_unique"], "per_class": selection["per_class"],
        "student_steps": student["steps"], "student_images_seen": student["images_seen"],
        "student_img_s": round(student["images_seen"] / student["seconds"], 1) if student["seconds"] else None,
        "student_num_pseudo": student["num_pseudo"], "teacher_steps": teacher["steps"],
        "test_top1": {"teacher": teacher["test_top1"], "student": student["test_top1"]},
        "run_seconds": round(summary["seconds"], 1),
    }


# ------------------------------------------------------------------------------ the driver


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_case(work: Path, data: Path, form: str, n: int, args, env: dict) -> dict:
    """Write a pool of ``n`` images in ``form``, run the whole loop on it in a child process (its
    own peak RSS), and remove both the pool and the run."""
    name = f"{form}-{n}"
    pool_dir = work / f"pool-{name}"
    t = time.perf_counter()
    shutil.rmtree(pool_dir, ignore_errors=True)
    pool = write_webdataset(pool_dir, n, args.tar_size) if form == "webdataset" else write_folder(pool_dir, n)
    write_s = time.perf_counter() - t
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = _load()
    out = subprocess.run([sys.executable, __file__, "--child", str(run_dir),
                          "--sets", json.dumps(overrides(data, pool, n, args))],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{name}: the run failed (exit {out.returncode})")
    shutil.rmtree(pool_dir, ignore_errors=True)  # the big data goes as soon as it has been used
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"form": form, "images": n, "write_pool_s": round(write_s, 1), "load_before": load_before,
            "load_after": _load(), **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^3 and 10^4, WebDataset and folder")
    ap.add_argument("--wds-sizes", type=int, nargs="*", default=None, help="default 1e4 1e5 1e6")
    ap.add_argument("--folder-sizes", type=int, nargs="*", default=None, help="default 1e4 1e5")
    ap.add_argument("--model", default="ns_cnn_s")
    ap.add_argument("--steps", type=int, default=100, help="student steps at every size")
    ap.add_argument("--batch-size", type=int, default=32, help="labeled images per step")
    ap.add_argument("--ratio", type=float, default=1.0, help="pseudo-labeled images per labeled image")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=4096, help="pseudo.shard_size (folder pools)")
    ap.add_argument("--tar-size", type=int, default=4096, help="samples per WebDataset tar")
    ap.add_argument("--label-batch", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers")
    ap.add_argument("--work", type=Path, help="where to write data and runs (default: a temp folder, removed)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sets", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, json.loads(args.sets))))
        return {}

    wds = args.wds_sizes if args.wds_sizes is not None else ([1000, 10_000] if args.quick else [10**4, 10**5, 10**6])
    folder = (args.folder_sizes if args.folder_sizes is not None
              else ([1000, 10_000] if args.quick else [10**4, 10**5]))
    cases = [("webdataset", n) for n in wds] + [("folder", n) for n in folder]
    work = args.work or Path(tempfile.mkdtemp(prefix="pipeline_scale_"))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one torch thread in every run
    runs: dict[str, dict] = {}
    try:
        data = work / "labeled"
        if not data.is_dir():
            write_labeled(data)
        for form, n in cases:
            name = f"{form}-{n}"
            runs[name] = run_case(work, data, form, n, args, env)
            print(json.dumps({name: runs[name]}), file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    def ratio(key: str, names=None) -> float:
        values = [r[key] for n, r in runs.items() if names is None or n in names]
        return round(max(values) / min(values), 3)

    by_form = {f: [n for n, r in runs.items() if r["form"] == f] for f in ("webdataset", "folder")}
    result = {
        "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in runs.items()},
        "worker_peak_rss_mb": {n: r["worker_peak_rss_mb"] for n, r in runs.items()},
        "rss_ratio": ratio("peak_rss_mb"), "worker_rss_ratio": ratio("worker_peak_rss_mb"),
        "rss_ratio_by_form": {f: ratio("peak_rss_mb", names) for f, names in by_form.items() if names},
        "stage_seconds": {n: r["stage_seconds"] for n, r in runs.items()},
        "label_img_s": {n: r["label_img_s"] for n, r in runs.items()},
        "student_img_s": {n: r["student_img_s"] for n, r in runs.items()},
        "student_steps": {n: r["student_steps"] for n, r in runs.items()},
        # False when a class got no pseudo label (a smaller selection, so fewer steps): compare with care
        "same_steps": len({r["student_steps"] for r in runs.values()}) == 1,
        "selected": {n: r["selected"] for n, r in runs.items()},
        "stage_rss_mb": {n: r["stage_rss_mb"] for n, r in runs.items()},
        "load": {n: [r["load_before"], r["load_after"]] for n, r in runs.items()},
        "settings": {"model": args.model, "image_size": SIZE, "steps": args.steps, "batch_size": args.batch_size,
                     "ratio": args.ratio, "shard_size": args.shard_size, "tar_size": args.tar_size,
                     "label_batch": args.label_batch, "workers": args.workers, "threads": 1},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
