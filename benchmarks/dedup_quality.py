"""Pool hygiene: does selection find planted copies of test images in a large pool, how many other
pool images does it drop, and what does hashing cost the labeler?

The held-out side is Fashion-MNIST's 10k test images (``/usr/share/datasets/fashion-mnist``).
The pool (``--pool`` background images, default 10^5) is procedurally generated, so that no
background image is a copy of a test image: grayscale images of 24..64 px, each a few random
ellipses and rectangles over a smooth random field with noise. Into it go ``--planted`` random test
images, each four ways: ``exact`` (the pixels, as PNG), ``resized`` (half up to 56 px bicubic,
half down to 20 px bilinear), ``jpeg`` (JPEG quality 75 at 28 px) and ``crop`` (2 px off every side,
24 px). Every pool image is held as encoded bytes (PNG, or JPEG for the ``jpeg`` copies) and decoded
by the labeler, as files would be.

1. Quality: the real labeler (``label_to_store``, model ``ns_cnn_s`` at 28 px, 1 decoding worker)
   labels the whole pool with hashes; ``write_heldout_hashes`` hashes the test split; then
   ``select_from_store(threshold=0, balance=False, heldout=...)`` at each ``--distances`` value.
   A planted copy counts as found when it is not in the selection; every other dropped image is a
   false positive. Recall per kind and false positives as a share of the pool.
2. In-distribution look-alikes (reported, not a pass/fail figure): Fashion-MNIST's own 60k training
   images against its test images, by brute force (``np.bitwise_count``): the share within each
   distance of some test image. These are mostly different garments with the same silhouette, and
   the reason the pipeline does not check a pool that is the labeled dataset's own training split.
3. Cost: ``--throughput-images`` pool images labeled with and without hashes, alternately,
   ``--repeats`` times each; the ratio of the best rates, of the median rates, of each pair, and
   of the median CPU time per image (main process and its DataLoader workers: on a shared machine
   single runs' rates vary by 10% and more, their CPU time much less). ``--throughput-only``:
   only this, on background images.
4. Query scale (``--scale-rows N``; ``--scale-only`` skips 1-3): a store of N rows with random
   hashes (written with the real writer, 8 shards) against ``--scale-heldout`` random held-out
   hashes: ``select_from_store`` on one thread with and without the dedup, at each distance.

    python benchmarks/dedup_quality.py                      # 10^5 + 4 x 1000 images, ~10 min on 2 cores
    python benchmarks/dedup_quality.py --pool 3000 --planted 100 --throughput-images 2000   # smoke
    python benchmarks/dedup_quality.py --scale-only --scale-rows 2000000 --scale-heldout 100000 --distances 4 6
    python benchmarks/dedup_quality.py --throughput-only --throughput-images 10000 --repeats 5

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from noisystudent.data.datasets import ImageSet, load_fashion_mnist
from noisystudent.data.pool import ImageSetSource
from noisystudent.data.transforms import eval_transform
from noisystudent.label.hashing import hamming, hash_images, write_heldout_hashes
from noisystudent.label.inference import label_to_store
from noisystudent.label.select import select_from_store
from noisystudent.models.factory import create_model
from noisystudent.runtime.cpu import cpu_description

KINDS = ("exact", "resized", "jpeg", "crop")


class EncodedImages(ImageSet):
    """Images held as encoded bytes, decoded on load (as the labeler decodes files)."""

    mode = "L"
    targets = None

    def __init__(self, blobs: list[bytes]):
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def load(self, index: int) -> Image.Image:
        img = Image.open(io.BytesIO(self.blobs[index]))
        img.load()
        return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def background(rng: np.random.Generator) -> Image.Image:
    """One procedural image: a smooth random field, a few shapes, pixel noise."""
    side = int(rng.integers(24, 65))
    coarse = rng.uniform(0, 255, (4, 4)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, side, 2)
        x1, y1 = x0 + rng.integers(3, side), y0 + rng.integers(3, side)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1), int(y1)), fill=int(rng.integers(0, 256)))
    arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (side, side))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def planted_copy(img: Image.Image, kind: str, j: int) -> bytes:
    if kind == "exact":
        return encode(img)
    if kind == "resized":
        return encode(img.resize((56, 56), Image.BICUBIC) if j % 2 == 0 else img.resize((20, 20), Image.BILINEAR))
    if kind == "jpeg":
        return encode(img, "JPEG", quality=75)
    return encode(img.crop((2, 2, 26, 26)))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the labeler's DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def label(pool: EncodedImages, store: Path, hashes: bool, model, shard_size: int) -> tuple[float, float]:
    """Label the pool into a fresh store; returns (images per second, CPU microseconds per image,
    main process and workers together: on a shared machine the steadier of the two)."""
    shutil.rmtree(store, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = label_to_store(model, ImageSetSource(pool, shard_size=shard_size), store,
                              transform=eval_transform(28, 1, (0.5,), (0.25,)), num_classes=10, teacher="bench",
                              device="cpu", num_workers=1, batch_size=256, progress=False, precision="fp32",
                              hashes=hashes)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert manifest.num_rows == len(pool), (manifest.num_rows, len(pool))
    return len(pool) / seconds, 1e6 * cpu / len(pool)


def query_scale(rows: int, num_heldout: int, distances: list[int], seed: int) -> dict:
    """Seconds of select_from_store with and without the dedup on a store of random hashes."""
    from noisystudent.label.store import StoreHeader, write_header, write_shard
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(prefix="dedup-scale-"))
    shards = 8
    header = StoreHeader(num_classes=10, teacher="bench", top_k=2, temperature=1.0, precision="fp32",
                         source={"kind": "bench", "num_shards": shards})
    out: dict = {"rows": rows, "heldout": num_heldout}
    try:
        write_header(work / "store", header)
        for i in range(shards):
            n = rows // shards + (1 if i < rows % shards else 0)
            probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
            top = np.argsort(-probs, 1)[:, :2]
            hashes = rng.integers(0, 2**63, (n, 2), dtype=np.int64).astype(np.uint64) * np.uint64(2)
            write_shard(work / "store", header, i, f"s{i}", [f"{i}/{j}" for j in range(n)], top,
                        np.take_along_axis(probs, top, 1), hashes=hashes)
        random64 = lambda: pa.array(rng.integers(0, 2**63, num_heldout).astype(np.uint64) * np.uint64(2), pa.uint64())
        pq.write_table(pa.table({"split": ["test"] * num_heldout, "index": np.arange(num_heldout),
                                 "content_hash": random64(), "phash": random64()}), work / "held.parquet")
        t = time.perf_counter()
        select_from_store(work / "store", work / "plain" / "selection.parquet", threshold=0.3, threads=1)
        out["without_dedup_s"] = round(time.perf_counter() - t, 1)
        for d in distances:
            t = time.perf_counter()
            sel = select_from_store(work / "store", work / f"d{d}" / "selection.parquet", threshold=0.3, threads=1,
                                    heldout=work / "held.parquet", dedup_distance=d)
            out[f"distance_{d}"] = {"seconds": round(time.perf_counter() - t, 1), "bands": sel.dedup["bands"],
                                    "dropped": sel.dedup["dropped"]}
            print(f"scale: {rows} rows x {num_heldout} held-out, distance {d}: {out[f'distance_{d}']} "
                  f"(without dedup {out['without_dedup_s']}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def throughput(pool: EncodedImages, model, work: Path, args) -> dict:
    """Label ``pool`` without and with hashes, alternately, ``args.repeats`` times each: rates,
    CPU per image, and the on/off ratios (of the medians, of the best runs, and of each pair)."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            rate, us = label(pool, work / "tp", mode == "on", model, args.shard_size)
            rates[mode].append(rate)
            cpu[mode].append(us)
            print(f"throughput hashes {mode}: {rate:.0f} img/s, {us:.0f} us CPU per image "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return {"images": len(pool), "off_img_s": [round(r, 1) for r in rates["off"]],
            "on_img_s": [round(r, 1) for r in rates["on"]],
            "ratio_best": round(max(rates["on"]) / max(rates["off"]), 3),
            "ratio_median": round(float(np.median(rates["on"]) / np.median(rates["off"])), 3),
            "ratio_pairs": [round(a / b, 3) for a, b in zip(rates["on"], rates["off"])],
            "off_cpu_us_per_image": [round(c, 1) for c in cpu["off"]],
            "on_cpu_us_per_image": [round(c, 1) for c in cpu["on"]],
            "cpu_ratio_median": round(float(np.median(cpu["off"]) / np.median(cpu["on"])), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=100_000, help="procedural background images")
    ap.add_argument("--planted", type=int, default=1000, help="test images planted, each in every kind")
    ap.add_argument("--distances", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--throughput-images", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the labeling process")
    ap.add_argument("--scale-rows", type=int, default=0, help="also time the query on a store of this many rows")
    ap.add_argument("--scale-heldout", type=int, default=100_000)
    ap.add_argument("--scale-only", action="store_true", help="only the query-scale measurement")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the labeling cost (--throughput-images background images)")
    args = ap.parse_args(argv)
    if args.throughput_only:
        torch.set_num_threads(args.threads)
        rng = np.random.default_rng(args.seed)
        pool = EncodedImages([encode(background(rng)) for _ in range(args.throughput_images)])
        work = Path(tempfile.mkdtemp(prefix="dedup-tp-"))
        try:
            tp = throughput(pool, create_model("ns_cnn_s", 10, 1), work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result = {"throughput": tp, "seed": args.seed, "torch_threads": args.threads, "cpu": cpu_description()}
        print(json.dumps(result))
        return result
    if args.scale_only:
        result = {"scale": query_scale(args.scale_rows, args.scale_heldout, args.distances, args.seed),
                  "seed": args.seed, "cpu": cpu_description()}
        print(json.dumps(result))
        return result
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    train, test = load_fashion_mnist(None, False)
    blobs, planted = planted_pool(args, test, rng)
    pool = EncodedImages(blobs)
    print(f"pool: {len(pool)} images ({args.pool} background + {len(planted)} planted), built in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)

    model = create_model("ns_cnn_s", 10, 1)
    work = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    try:
        t = time.perf_counter()
        full_rate, _ = label(pool, work / "store", True, model, args.shard_size)
        label_s = time.perf_counter() - t
        print(f"labeled with hashes: {full_rate:.0f} img/s", flush=True)
        held = work / "heldout.parquet"
        t = time.perf_counter()
        write_heldout_hashes(held, {"test": test}, "L")
        heldout_s = time.perf_counter() - t
        # each shard's first pool row: a selection names rows by (shard, index)
        offsets = np.cumsum([0] + [min(args.shard_size, len(pool) - s) for s in range(0, len(pool), args.shard_size)])
        quality = {d: dedup_quality(work, held, offsets, planted, d, args) for d in args.distances}
        lookalikes = lookalike_share(train, test, args.distances)
        tp = throughput(EncodedImages(blobs[:args.throughput_images]), model, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "pool_background": args.pool, "planted_per_kind": args.planted, "pool_total": len(pool),
        "heldout": len(test), "seed": args.seed, "quality": quality,
        "fmnist_train_lookalike_share": lookalikes,
        "throughput": tp,
        "label_full_pool_seconds": round(label_s, 1), "label_full_pool_img_s": round(full_rate, 1),
        "heldout_hash_seconds": round(heldout_s, 1), "seconds": round(time.perf_counter() - t0, 1),
        "cpu": cpu_description(), "torch_threads": args.threads, "python": sys.version.split()[0],
    }
    if args.scale_rows:
        result["scale"] = query_scale(args.scale_rows, args.scale_heldout, args.distances, args.seed)
    print(json.dumps(result))
    return result


def planted_pool(args, test, rng) -> tuple[list[bytes], dict[int, tuple[str, int]]]:
    """``args.pool`` procedural backgrounds plus ``args.planted`` test images in every kind of copy,
    shuffled so the copies spread over the shards; the copies' pool rows -> (kind, test index)."""
    blobs = [encode(background(rng)) for _ in range(args.pool)]
    chosen = rng.choice(len(test), args.planted, replace=False)
    planted: dict[int, tuple[str, int]] = {}
    for j, t in enumerate(chosen):
        img = test.load(int(t))
        for kind in KINDS:
            planted[len(blobs)] = (kind, int(t))
            blobs.append(planted_copy(img, kind, j))
    order = rng.permutation(len(blobs))
    blobs = [blobs[i] for i in order]
    return blobs, {int(np.flatnonzero(order == row)[0]): v for row, v in planted.items()}


def dedup_quality(work: Path, held: Path, offsets: np.ndarray, planted: dict, distance: int, args) -> dict:
    """Select from the labeled store with dedup at ``distance``: the share of each kind of planted
    copy dropped (recall) and the backgrounds dropped (false positives). ``offsets``: each shard's
    first pool row (the last entry is the pool's size)."""
    t = time.perf_counter()
    sel = select_from_store(work / "store", work / f"sel-{distance}" / "selection.parquet", threshold=0.0,
                            balance=False, heldout=held, dedup_distance=distance, threads=1)
    seconds = time.perf_counter() - t
    table = pq.read_table(sel.path, columns=["shard", "index"])
    kept = np.zeros(int(offsets[-1]), bool)
    kept[offsets[table.column("shard").to_numpy()] + table.column("index").to_numpy()] = True
    recall = {k: float(np.mean([not kept[r] for r, (kind, _) in planted.items() if kind == k])) for k in KINDS}
    false_pos = int((~kept).sum()) - sum(not kept[r] for r in planted)
    print(f"distance {distance}: recall {recall}, false positives {false_pos} "
          f"({100 * false_pos / args.pool:.3f}% of the pool), select {seconds:.1f}s", flush=True)
    return {"recall": recall, "false_positives": false_pos, "false_positive_share": false_pos / args.pool,
            "dropped": sel.dedup["dropped"], "exact": sel.dedup["exact"], "bands": sel.dedup["bands"],
            "select_seconds": round(seconds, 2)}


def lookalike_share(train, test, distances: list[int]) -> dict[int, float]:
    """In-distribution look-alikes: the share of Fashion-MNIST train images within each perceptual-hash
    distance of some test image."""
    _, p_train = hash_images((train.load(i) for i in range(len(train))), "L")
    _, p_test = hash_images((test.load(i) for i in range(len(test))), "L")
    nearest = np.full(len(p_train), 64)
    for s in range(0, len(p_test), 1000):
        nearest = np.minimum(nearest, hamming(p_train[:, None], p_test[None, s:s + 1000]).min(1))
    shares = {d: float((nearest <= d).mean()) for d in distances}
    print(f"Fashion-MNIST train images within d of a test image: {shares}", flush=True)
    return shares


if __name__ == "__main__":
    main()
