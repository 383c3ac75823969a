"""Corruption throughput: our batched torch corruptions vs the ``imagecorruptions`` package.

    python benchmarks/corruption_speed.py [--size 224] [--batch 32] [--ref-images 4] [--threads 1]

The reference package (imagecorruptions 1.1.2, per-image numpy / OpenCV / scikit-image) is
installed only in this benchmark's own virtual environment (``./.bench-venv`` by default, made
with ``--system-site-packages`` so it reuses numpy / scipy / Pillow), together with what its
release still needs: ``setuptools<82`` (it imports ``pkg_resources``), scikit-image and OpenCV
(headless build). Its glass_blur, gaussian_blur and fog crash on current scikit-image / numpy;
the comparison covers the corruptions it can still run (16 of 19).

Both sides corrupt the same images (RGB, ``--size`` px) at all 5 severities with the same thread
count. Throughput = corrupted images produced / seconds, per corruption and over the suite
(total images / total time), by wall clock and by process CPU time; the headline speed-up uses
CPU time, which a busy shared machine distorts less. The last line printed is a JSON object.
Exit status 2 when the reference cannot be installed or run (our figures are still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

REFERENCE = "imagecorruptions==1.1.2"
REFERENCE_DEPS = ["setuptools<82", "scikit-image", "opencv-python-headless"]

# Runs inside the benchmark venv: times imagecorruptions on the saved images, prints JSON.
WORKER = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
import cv2
cv2.setNumThreads(int(sys.argv[3]))
import imagecorruptions
from imagecorruptions import corrupt
images = np.load(sys.argv[1])
names = json.loads(sys.argv[2])
np.random.seed(0)
out = {"version": getattr(imagecorruptions, "__version__", "1.1.2"), "images_per_sec": {}, "seconds": {},
       "cpu_seconds": {}, "images": {}, "failed": {}}
for name in names:
    try:
        corrupt(images[0], corruption_name=name, severity=1)  # warm-up (imports, frost files, caches)
        t, c = time.perf_counter(), time.process_time()
        for s in range(1, 6):
            for img in images:
                corrupt(img, corruption_name=name, severity=s)
        out["seconds"][name] = time.perf_counter() - t
        out["cpu_seconds"][name] = time.process_time() - c
        out["images"][name] = 5 * len(images)
        out["images_per_sec"][name] = 5 * len(images) / out["seconds"][name]
    except Exception as exc:
        out["failed"][name] = f"{type(exc).__name__}: {exc}"[:200]
print(json.dumps(out))
"""


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_reference_env(venv: Path, install: bool) -> Path:
    """Create the benchmark venv and install the reference package there (idempotent)."""
    py = _venv_python(venv)
    if not py.exists():
        if not install:
            raise RuntimeError(f"no benchmark venv at {venv} (run without --no-install)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import imagecorruptions, cv2, skimage"], capture_output=True)
    if probe.returncode != 0:
        if not install:
            raise RuntimeError(f"imagecorruptions not importable in {venv}: {probe.stderr.decode()[-300:]}")
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + REFERENCE_DEPS, check=True)
        # no deps: its opencv-python requirement wants a GUI build; the headless one is the same code
        subprocess.run(pip + ["--no-deps", REFERENCE], check=True)
        probe = subprocess.run([str(py), "-c", "import imagecorruptions"], capture_output=True)
        if probe.returncode != 0:
            raise RuntimeError(f"imagecorruptions does not import: {probe.stderr.decode()[-300:]}")
    return py


def test_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-looking RGB test images (smooth gradients, shapes, texture), uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        img = np.stack([a + 0.3 * np.sin(2 * np.pi * (xx * rng.uniform(1, 4) + yy)),
                        b + 0.3 * (xx - yy), np.full_like(xx, c)], -1)
        cx, cy, r = rng.uniform(0.2, 0.8, 3) * [1, 1, 0.4]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] += rng.uniform(-0.4, 0.4, 3)
        img += rng.normal(0, 0.03, img.shape)
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def time_ours(images: np.ndarray, names: list[str], batch: int, device: str) -> dict:
    import torch

    from noisystudent.robustness import corrupt

    x = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).float().div(255).to(device)
    x = x.repeat(-(-batch // len(x)), 1, 1, 1)[:batch]
    res = {"images_per_sec": {}, "seconds": {}, "cpu_seconds": {}, "images": {}, "batch": batch}
    for name in names:
        g = torch.Generator(device=device).manual_seed(0)
        corrupt(x[:2], name, 1, g)  # warm-up (caches, kernels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        for s in range(1, 6):
            corrupt(x, name, s, g)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        res["seconds"][name] = time.perf_counter() - t
        res["cpu_seconds"][name] = time.process_time() - c
        res["images"][name] = 5 * batch
        res["images_per_sec"][name] = 5 * batch / res["seconds"][name]
    return res


def suite_rate(res: dict, names: list[str], clock: str = "seconds") -> float:
    """Corrupted images per second over ``names`` (total images / total time)."""
    return sum(res["images"][n] for n in names) / sum(res[clock][n] for n in names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="image side (RGB)")
    ap.add_argument("--batch", type=int, default=32, help="batch size for our corruptions")
    ap.add_argument("--ref-images", type=int, default=4, help="images per severity for imagecorruptions")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides")
    ap.add_argument("--device", default="cpu", help="device for ours (cpu, cuda)")
    ap.add_argument("--venv", type=Path, default=ROOT / ".bench-venv", help="venv for the reference package")
    ap.add_argument("--no-install", action="store_true", help="do not create the venv or pip install")
    args = ap.parse_args()

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from noisystudent.robustness import ALL_CORRUPTIONS

    names = list(ALL_CORRUPTIONS)
    images = test_images(max(args.batch, args.ref_images), args.size)
    report: dict = {"image_size": args.size, "channels": 3, "threads": args.threads, "device": args.device,
                    "severities": [1, 2, 3, 4, 5]}
    print(f"ours: {len(names)} corruptions x 5 severities x {args.batch} images on {args.device} ...", flush=True)
    ours = time_ours(images, names, args.batch, args.device)
    for n in names:
        print(f"  {n:18s} {ours['images_per_sec'][n]:9.1f} img/s", flush=True)
    report["ours"] = {"images_per_sec": ours["images_per_sec"], "batch": args.batch,
                      "suite_images_per_sec_all19": suite_rate(ours, names),
                      "suite_images_per_cpu_sec_all19": suite_rate(ours, names, "cpu_seconds")}
    status = 0
    try:
        py = ensure_reference_env(args.venv, install=not args.no_install)
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "images.npy", images[:args.ref_images])
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            print(f"imagecorruptions: {len(names)} corruptions x 5 severities x {args.ref_images} images ...",
                  flush=True)
            proc = subprocess.run([str(py), "-c", WORKER, str(Path(tmp) / "images.npy"), json.dumps(names),
                                   str(args.threads)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-500:])
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        ran = [n for n in names if n in ref["images_per_sec"]]
        for n in names:
            shown = f"{ref['images_per_sec'][n]:9.1f} img/s" if n in ran else "crashed: " + ref["failed"][n][:70]
            print(f"  {n:18s} {shown}", flush=True)
        k = len(ran)
        report["imagecorruptions"] = {"version": ref["version"], "images_per_sec": ref["images_per_sec"],
                                      "images_per_severity": args.ref_images, "failed": ref["failed"],
                                      f"suite_images_per_sec_common{k}": suite_rate(ref, ran),
                                      f"suite_images_per_cpu_sec_common{k}": suite_rate(ref, ran, "cpu_seconds")}
        report["ours"][f"suite_images_per_sec_common{k}"] = suite_rate(ours, ran)
        report["ours"][f"suite_images_per_cpu_sec_common{k}"] = suite_rate(ours, ran, "cpu_seconds")
        report["common_corruptions"] = ran
        # CPU time is the headline: the machine may be shared, and both sides use the same threads
        report["speedup_suite"] = suite_rate(ours, ran, "cpu_seconds") / suite_rate(ref, ran, "cpu_seconds")
        report["speedup_suite_wall"] = suite_rate(ours, ran) / suite_rate(ref, ran)
        report["speedup_per_corruption"] = {
            n: (ours["images"][n] / ours["cpu_seconds"][n]) / (ref["images"][n] / ref["cpu_seconds"][n]) for n in ran}
    except Exception as exc:  # no network, pip failure, crash: report, keep our figures
        report["imagecorruptions"] = f"unavailable: {type(exc).__name__}: {str(exc)[-300:]}"
        status = 2
    print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
