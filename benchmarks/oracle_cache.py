"""The accuracy benchmark's cache of oracles (benchmarks/accuracy.py): one JSON file per config
fingerprint, so a recipe trial that leaves an oracle's config alone reads it back instead of
training it again (about 17 minutes of a core per Fashion-MNIST oracle)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CACHE_VERSION = 1  # of the oracles' cache entries (another version is a miss)


def oracle_cache_path(cache_dir: Path, fingerprint: str) -> Path:
    """Where the oracle of one config is kept: ``<cache>/oracle-<fingerprint>.json``."""
    return Path(cache_dir) / f"oracle-{fingerprint}.json"


def read_cached_oracle(path: Path, fingerprint: str) -> dict | None:
    """The cached record, or None when there is none, it is unreadable, or it was made by another
    config (its fingerprint) or another cache format."""
    try:
        entry = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if entry.get("version") != CACHE_VERSION or entry.get("fingerprint") != fingerprint:
        return None
    return entry


def write_cached_oracle(path: Path, fingerprint: str, task, stage: dict) -> dict:
    """Store a finished oracle of ``task`` (an accuracy.Task: its seed and overrides are kept),
    written to a temp file, then renamed."""
    entry = {"version": CACHE_VERSION, "fingerprint": fingerprint, "seed": task.seed, "overrides": task.overrides,
             "test_top1": stage["test_top1"], "val_top1": stage["val_top1"], "seconds": stage["seconds"],
             "best_epoch": stage.get("best_epoch"), "epochs": stage.get("epochs"), "model": stage.get("model"),
             "num_labeled": stage.get("num_labeled"), "precision": stage.get("precision"),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entry, indent=2))
    os.replace(tmp, path)
    return entry
