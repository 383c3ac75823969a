"""Remote labeling throughput: the same WebDataset shards labeled from local disk and over HTTP.

The shards (JPEG samples in plain tars) are served by ``python -m http.server`` on 127.0.0.1 in a
separate process (so the server does not share the labeler's interpreter), and labeled by
``label_to_store`` with the same teacher, transform, batch size and DataLoader workers, once from
``/path/pool-{0000..N}.tar`` and once from ``http://127.0.0.1:PORT/pool-{0000..N}.tar`` (fsspec's
http, streamed, with the retrying reader of :mod:`noisystudent.data.pool.remote`). Runs alternate
(local, http, local, http, ...) so load from other processes on a shared machine hits both alike;
the median of each is reported. The rate is the whole call's (opening the shards, preparing the
model, writing the store), as a user sees it.

    python benchmarks/remote_label.py [--model resnet18] [--shards 16] [--per-shard 256] ...

The last line printed is a JSON object with ``local_img_s``, ``http_img_s`` and ``ratio``
(http / local; the target is >= 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from noisystudent.data.pool import webdataset_source
from noisystudent.data.transforms import eval_transform
from noisystudent.label.inference import default_num_workers, label_to_store
from noisystudent.models.factory import create_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> None:
    """Smooth random colour fields with some texture, as JPEG samples in ``pool-NNNN.tar``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"pool-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                for name, data in ((f"{s:04d}_{i:05d}.jpg", buf.getvalue()), (f"{s:04d}_{i:05d}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on a free loopback port; returns the process and its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/pool-0000.tar", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the HTTP server did not start")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--file-size", type=int, default=96, help="side of the JPEG images")
    ap.add_argument("--input-size", type=int, default=64, help="side of the model input")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=default_num_workers())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1000)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="remote_label_"))
    server = None
    try:
        write_shards(work / "shards", args.shards, args.per_shard, args.file_size)
        server, url = serve(work / "shards")
        pattern = f"/pool-{{0000..{args.shards - 1:04d}}}.tar"
        pools = {"local": str(work / "shards") + pattern, "http": url + pattern}
        transform = eval_transform(args.input_size, 3, MEAN, STD)
        model = create_model(args.model, args.classes, 3).eval()
        images = args.shards * args.per_shard
        print(f"{args.model}, {images} JPEGs {args.file_size}px -> {args.input_size}px in {args.shards} tars, batch "
              f"{args.batch_size}, {args.workers} worker(s), {torch.get_num_threads()} threads", file=sys.stderr)
        rates: dict[str, list[float]] = {"local": [], "http": []}
        keys = {}
        for r in range(args.rounds):
            for form, pool in pools.items():
                store = work / f"store-{form}-{r}"
                t = time.perf_counter()
                manifest = label_to_store(model, webdataset_source(pool), store, transform=transform,
                                          num_classes=args.classes, teacher=args.model, top_k=5,
                                          batch_size=args.batch_size, num_workers=args.workers, precision="fp32",
                                          progress=False)
                rates[form].append(manifest.num_rows / (time.perf_counter() - t))
                keys[form] = pq.read_table(store / "shards", columns=["key", "predicted"]).sort_by("key")
                shutil.rmtree(store)
                print(f"round {r + 1}: {form} {rates[form][-1]:.0f} img/s", file=sys.stderr)
        assert keys["local"].equals(keys["http"]) and keys["local"].num_rows == images, "http labels differ"
        local, http = statistics.median(rates["local"]), statistics.median(rates["http"])
        result = {"model": args.model, "images": images, "shards": args.shards, "file_size": args.file_size,
                  "input_size": args.input_size, "batch_size": args.batch_size, "workers": args.workers,
                  "threads": torch.get_num_threads(), "rounds": args.rounds,
                  "local_img_s": round(local, 1), "http_img_s": round(http, 1), "ratio": round(http / local, 3),
                  "local_all": [round(x, 1) for x in rates["local"]], "http_all": [round(x, 1) for x in rates["http"]],
                  "same_labels": True}
        print(json.dumps(result))
        return result
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
