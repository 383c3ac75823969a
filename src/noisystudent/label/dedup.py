"""Pool hygiene in the select stage: pool images that copy a held-out image, and copies within the pool.

Both run as DuckDB queries over the hash columns of the pseudo-label store's shards
(:mod:`noisystudent.label.hashing` says what the hashes are), so they scale with the store, not
with memory:

* :func:`find_duplicates`: the pool images that are exact or near copies of a validation or test
  image (the same content hash, or perceptual hashes at most ``distance`` bits apart). The
  selection (:func:`noisystudent.label.select.select_from_store`) drops them.
* :func:`count_pool_duplicates`: the pool images that have a copy elsewhere in the pool, by the
  same rule. They are counted, not dropped: a web pool holds many copies of popular images, and
  how many is worth knowing (each copy is one more vote for that image's pseudo label), but which
  copy to keep is not the selection's call.

Both cut the 64-bit perceptual hash into bands (:func:`band_layout`): two hashes within ``d`` bits
agree within ``d // m`` bits on at least one of ``m`` bands, so a hash join on band values (and
their variants within that radius) finds every candidate pair, and ``bit_count(xor(a, b)) <= d``
keeps the true ones.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runtime.errors import ConfigError, DataError
from .hashing import PHASH_BITS
from .store import HASH_COLUMNS, LabelStore

log = logging.getLogger("noisystudent")

DEDUP_EXAMPLES = 8  # example (pool image, held-out image) pairs kept in the summary
POOL_EXAMPLES = 5  # example pairs of copies within the pool kept in the summary
MAX_PROBES = 50_000_000  # band variants of the held-out hashes a band layout may enumerate
PROBE_WEIGHT = 4  # a band variant's cost against a pool row's in band_layout (it is held in memory)
# Candidate pairs (band matches, before the whole-hash check) the in-pool count may join. The
# count's other steps are scans and GROUP BYs, linear in the pool; the join's candidates grow with
# the square of the distinct hashes (chance band matches) and of clusters of look-alikes, so it is
# counted first, and a pool beyond this is reported as not counted rather than slowing the stage.
MAX_POOL_CANDIDATES = 300_000_000


def dedup_wanted(cfg) -> bool:
    """Whether a run's pool is checked against its held-out splits (``pseudo.dedup``): not when it is
    ``none``, and not when the whole pool is the labeled dataset's own training images (moved there
    by ``data.labels_per_class``; no ``data.unlabeled``): the dataset's split already keeps those
    apart from its test images, and on small look-alike images (28 px Fashion-MNIST) a perceptual
    hash calls 16% of the training images near copies of some test image (docs/benchmarks.md)."""
    if cfg.pseudo.dedup == "none":
        return False
    return cfg.data.unlabeled is not None or cfg.data.source == "torchvision"  # e.g. STL-10's unlabeled split


def band_layout(distance: int, num_pool: int, num_heldout: int, max_probes: float = MAX_PROBES) -> int:
    """How many bands to cut the 64-bit hashes into for :func:`find_duplicates`.

    With ``m`` bands, two hashes within ``distance`` bits agree within ``distance // m`` bits on at
    least one band (pigeonhole). So every pair is found by joining the pool's bands against the
    held-out bands and their variants within that radius, then checking the whole hash. Few wide
    bands enumerate many variants of the (small) held-out side; many narrow ones (``distance + 1``
    bands, radius 0) make many chance candidates on the (large) pool side. This picks the ``m``
    with the fewest rows through the join: pool rows x m + variants x PROBE_WEIGHT + expected chance
    candidates (for hashes of independent, uniform bits); a variant counts more than a pool row
    because the variants are the join's hash table, held in memory, where pool rows stream past.
    Layouts enumerating more than ``max_probes`` variants are passed over (except ``distance + 1``
    bands, which enumerate none). :func:`count_pool_duplicates` uses it with the pool on both sides.
    """
    best, best_cost = distance + 1, math.inf
    for m in range(1, min(distance + 1, PHASH_BITS) + 1):
        radius = distance // m
        variants = [sum(math.comb(w, i) for i in range(radius + 1)) for w in _band_widths(m)]
        probes = num_heldout * sum(variants)
        if probes > max_probes and m < distance + 1:
            continue
        chance = num_pool * num_heldout * sum(v / 2.0 ** w for v, w in zip(variants, _band_widths(m)))
        cost = num_pool * m + PROBE_WEIGHT * probes + chance
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _band_widths(m: int) -> list[int]:
    return [PHASH_BITS // m + (1 if i < PHASH_BITS % m else 0) for i in range(m)]


def _band_probes(heldout: pa.Table, distance: int, m: int) -> pa.Table:
    """``(band, value, row)``: every value within ``distance // m`` bits of held-out row ``row``'s
    band ``band`` (bands 0..m-1 of the perceptual hash), and band ``m``: its exact content hash."""
    phash = heldout.column("phash").to_numpy().astype(np.uint64)
    rows = np.arange(len(phash), dtype=np.int64)
    radius = distance // m
    bands, values, owners = [], [], []
    shift = 0
    for j, width in enumerate(_band_widths(m)):
        mask = np.uint64((1 << width) - 1)
        base = (phash >> np.uint64(shift)) & mask
        flips = np.array([sum(1 << b for b in bits) for r in range(radius + 1)
                          for bits in itertools.combinations(range(width), r)], dtype=np.uint64)
        values.append((base[:, None] ^ flips[None, :]).reshape(-1))
        owners.append(np.repeat(rows, len(flips)))
        bands.append(np.full(len(phash) * len(flips), j, np.int32))
        shift += width
    values.append(heldout.column("content_hash").to_numpy().astype(np.uint64))
    owners.append(rows)
    bands.append(np.full(len(phash), m, np.int32))
    return pa.table({"band": np.concatenate(bands), "value": pa.array(np.concatenate(values), pa.uint64()),
                     "row": np.concatenate(owners)})


def _band_sql(m: int, content: bool = True) -> tuple[str, str]:
    """The pool side's band numbers and band values (with ``content``, the content hash as band
    ``m``), as lists to unnest."""
    parts, shift = [], 0
    for width in _band_widths(m):
        parts.append(f"(phash >> {shift}) & CAST({(1 << width) - 1} AS UBIGINT)")
        shift += width
    parts += ["content_hash"] if content else []
    return f"[{', '.join(str(j) for j in range(len(parts)))}]", f"[{', '.join(parts)}]"


def _band_flips(m: int, radius: int) -> pa.Table:
    """``(band, flip)``: every mask of at most ``radius`` bits within band ``band``'s width."""
    bands, flips = [], []
    for j, width in enumerate(_band_widths(m)):
        masks = [sum(1 << b for b in bits) for r in range(radius + 1)
                 for bits in itertools.combinations(range(width), r)]
        bands += [j] * len(masks)
        flips += masks
    return pa.table({"band": pa.array(bands, pa.int32()), "flip": pa.array(flips, pa.uint64())})


def _pool_sql(files: list[str]) -> str:
    """The store's hash columns, with each row's shard number, as a subquery."""
    if not files:
        return "SELECT 0 AS shard, 0::BIGINT AS \"index\", 0::UBIGINT AS phash, 0::UBIGINT AS content_hash WHERE false"
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return ("SELECT CAST(regexp_extract(filename, 'part-(\\d+)\\.parquet$', 1) AS INTEGER) AS shard, \"index\", "
            f"phash, content_hash FROM read_parquet([{quoted}], filename = true)")


def _check_hashes(store: LabelStore) -> None:
    lacking = store.shards_without_hashes()
    if lacking:
        raise DataError(f"pseudo-label store {store.store_dir} has no image hashes in {len(lacking)} of "
                        f"{len(store.shards)} shards (first: {lacking[0].file}): it was labeled without them; "
                        "label into a new store, or set pseudo.dedup: none")


def read_heldout_hashes(path: Path) -> pa.Table:
    """The held-out hash file, checked."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"unreadable held-out hash file {path}: {e}") from None
    missing = {"split", "index", *HASH_COLUMNS} - set(table.column_names)
    if missing:
        raise DataError(f"held-out hash file {path} lacks column(s) {', '.join(sorted(missing))}")
    return table.select(["split", "index", *HASH_COLUMNS]).append_column(
        "row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def find_duplicates(con, store: LabelStore, files: list[str], heldout_path: Path, distance: int,
                    bands: int | None = None) -> dict:
    """Find the store's images that copy a held-out image; leave them in DuckDB table ``dropped``
    (``shard``, ``index``) and return the summary (counts, examples, the layout used).

    One scan of the store's hash columns through one hash join: each pool row's bands (and its
    content hash) against the held-out side's band variants (:func:`band_layout`), every candidate
    pair checked on the whole hash: ``bit_count(xor(a, b)) <= distance``, or the same content hash.
    """
    _check_hashes(store)
    heldout = read_heldout_hashes(heldout_path)
    m = bands or band_layout(distance, store.num_rows, heldout.num_rows)
    variants = sum(sum(math.comb(w, i) for i in range(distance // m + 1)) for w in _band_widths(m))
    if heldout.num_rows * variants > MAX_PROBES and m < distance + 1:
        raise ConfigError(f"{m} band(s) at distance {distance} would enumerate {heldout.num_rows * variants} "
                          f"band variants (at most {MAX_PROBES}); use more bands")
    con.register("heldout", heldout)
    con.register("probes", _band_probes(heldout, distance, m))
    con.execute('CREATE TEMP TABLE heldout_probes AS SELECT p.band, p.value, h.split, h."index" AS heldout_index, '
                "h.phash, h.content_hash FROM probes p JOIN heldout h ON p.row = h.row")
    band_ids, band_values = _band_sql(m)
    pool = _pool_sql(files)
    # The held-out side (right) is the join's build side and the pool streams past it: DuckDB would
    # otherwise build on whichever side it estimates smaller, and it misjudges the unnested pool
    # (bands x rows): built on the pool, the hash table grew with it (+200 MB at 10^6 images).
    con.execute("SET disabled_optimizers = 'build_side_probe_side'")
    try:
        con.execute(f"""
            CREATE TEMP TABLE pairs AS
            SELECT DISTINCT c.shard, c."index", h.split, h.heldout_index,
                   bit_count(xor(c.phash, h.phash)) AS distance, c.content_hash = h.content_hash AS exact
            FROM (SELECT shard, "index", phash, content_hash, unnest({band_ids}) AS band, unnest({band_values}) AS value
                  FROM ({pool})) c
            JOIN heldout_probes h ON c.band = h.band AND c.value = h.value
            WHERE bit_count(xor(c.phash, h.phash)) <= {int(distance)} OR c.content_hash = h.content_hash""")
    finally:
        con.execute("RESET disabled_optimizers")
    con.execute('CREATE TEMP TABLE dropped AS SELECT DISTINCT shard, "index" FROM pairs')
    dropped, exact = con.execute('SELECT count(*), count(*) FILTER (WHERE exact) FROM '
                                 '(SELECT shard, "index", bool_or(exact) AS exact FROM pairs GROUP BY ALL)').fetchone()
    by_split = dict(con.execute('SELECT split, count(DISTINCT (shard, "index")) FROM pairs GROUP BY split').fetchall())
    examples = con.execute(f'SELECT shard, "index", split, heldout_index, distance, exact FROM pairs '
                           f'ORDER BY distance, shard, "index", split, heldout_index LIMIT {DEDUP_EXAMPLES}').fetchall()
    num_pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
    splits = dict(con.execute("SELECT split, count(*) FROM heldout GROUP BY split").fetchall())
    summary = {"distance": int(distance), "dropped": int(dropped), "exact": int(exact),
               "near": int(dropped) - int(exact), "pairs": int(num_pairs),
               "by_split": {k: int(v) for k, v in sorted(by_split.items())},
               "heldout": {k: int(v) for k, v in sorted(splits.items())}, "bands": m,
               "examples": _with_keys(store, examples)}
    held = " and ".join(f"{n} {k}" for k, n in summary["heldout"].items()) or "no"
    log.info(f"pool hygiene: dropped {dropped} of {store.num_rows} pool image(s) that copy one of {held} "
             f"held-out images ({exact} exact, {dropped - exact} within {distance} bits)"
             + "".join(f"; {e['key']} ~ {e['split']}[{e['heldout_index']}] ({e['distance']} bits)"
                       for e in summary["examples"][:3]))
    return summary


def _keys(store: LabelStore, positions: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """The keys of the pool images at ``(shard, index)`` positions, read from their shards."""
    by_index = {rec.index: rec for rec in store.shards}
    keys: dict[tuple[int, int], str] = {}
    for shard in sorted({s for s, _ in positions}):
        t = store.read_shard(by_index[shard], ["key", "index"])
        wanted = {i for s, i in positions if s == shard}
        for key, index in zip(t.column("key").to_pylist(), t.column("index").to_pylist()):
            if index in wanted:
                keys[(shard, index)] = key
    return keys


def _with_keys(store: LabelStore, examples: list[tuple]) -> list[dict]:
    """Example pairs as dicts, with the pool image's key read from its shard."""
    keys = _keys(store, {(e[0], e[1]) for e in examples})
    return [{"key": keys.get((s, i)), "shard": int(s), "index": int(i), "split": split, "heldout_index": int(h),
             "distance": int(d), "exact": bool(x)} for s, i, split, h, d, x in examples]


def count_pool_duplicates(con, store: LabelStore, files: list[str], distance: int,
                          max_candidates: int = MAX_POOL_CANDIDATES, bands: int | None = None) -> dict:
    """Count the store's images that have a copy elsewhere in the pool: another image with the same
    perceptual hash or one at most ``distance`` bits away (``images``), and among them those whose
    decoded pixels another image shares (``exact``: the same content hash; same pixels give the same
    perceptual hash, so they are a part of ``images``; ``identical_phash``: those whose perceptual
    hash another image has, a lower bound of ``images``). Counted, not dropped. Returns the summary,
    with a few example pairs, closest first.

    The pool's distinct perceptual hashes (a GROUP BY) are joined with themselves on band values
    (:func:`band_layout`, the variants of one side within ``distance // bands`` bits), every
    candidate pair of distinct hashes checked on the whole hash; an image counts when its hash is
    shared or in such a pair. The candidate pairs are counted before they are joined (a GROUP BY
    per side): beyond ``max_candidates`` the summary says ``counted: false`` and why. ``bands``
    forces the band layout (tests).
    """
    pool = _pool_sql(files)
    # fetchall, not fetchone: DuckDB keeps a half-read result open, and register() refuses to run then
    exact, exact_groups = con.execute(f"SELECT coalesce(sum(n), 0), count(*) FROM (SELECT count(*) AS n FROM ({pool}) "
                                      "GROUP BY content_hash) WHERE n > 1").fetchall()[0]
    con.execute(f"CREATE OR REPLACE TEMP TABLE pool_phash AS SELECT phash, count(*)::BIGINT AS n FROM ({pool}) "
                "GROUP BY phash")
    distinct, identical = con.execute("SELECT count(*), coalesce(sum(n) FILTER (WHERE n > 1), 0) "
                                      "FROM pool_phash").fetchall()[0]
    m = bands or band_layout(distance, distinct, distinct, max_probes=math.inf)
    band_ids, band_values = _band_sql(m, content=False)
    con.register("pool_flips", _band_flips(m, distance // m))
    con.execute(f"CREATE OR REPLACE TEMP TABLE pool_bands AS SELECT phash, unnest({band_ids}) AS band, "
                f"unnest({band_values}) AS value FROM pool_phash")
    probes = "SELECT p.phash, p.band, xor(p.value, f.flip) AS value FROM pool_bands p JOIN pool_flips f USING (band)"
    candidates = con.execute(f"""
        SELECT coalesce(sum(a.n * b.n), 0) FROM (SELECT band, value, count(*) AS n FROM ({probes}) GROUP BY ALL) a
        JOIN (SELECT band, value, count(*) AS n FROM pool_bands GROUP BY ALL) b USING (band, value)""").fetchall()[0][0]
    summary = {"distance": int(distance), "exact": int(exact), "exact_groups": int(exact_groups),
               "identical_phash": int(identical), "distinct_phash": int(distinct), "bands": m,
               "candidates": int(candidates)}
    if candidates > max_candidates:
        log.info(f"pool hygiene: {identical} of {store.num_rows} pool image(s) share their perceptual hash with "
                 f"another ({exact} their pixels); copies within {distance} bits not counted: {candidates} "
                 f"candidate pairs (at most {max_candidates})")
        return summary | {"counted": False, "images": None, "pairs": None, "examples": []}
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE pool_pairs AS
        SELECT DISTINCT a.phash AS a, b.phash AS b FROM ({probes}) a
        JOIN pool_bands b ON a.band = b.band AND a.value = b.value
        WHERE a.phash < b.phash AND bit_count(xor(a.phash, b.phash)) <= {int(distance)}""")
    images, pairs = con.execute("""
        SELECT coalesce(sum(n), 0), (SELECT count(*) FROM pool_pairs) FROM pool_phash
        WHERE n > 1 OR phash IN (SELECT a FROM pool_pairs UNION SELECT b FROM pool_pairs)""").fetchall()[0]
    summary |= {"counted": True, "images": int(images), "pairs": int(pairs),
                "examples": _pool_examples(con, store, pool)}
    log.info(f"pool hygiene: {images} of {store.num_rows} pool image(s) have a copy elsewhere in the pool "
             f"({exact} the same pixels, the others within {distance} bits); counted, not dropped"
             + "".join(f"; {e['key']} ~ {e['other']} ({e['distance']} bits)" for e in summary["examples"][:3]))
    return summary


def _pool_examples(con, store: LabelStore, pool: str) -> list[dict]:
    """A few pairs of pool images that copy each other, closest first (the most repeated hash
    first among equals): two images of a repeated hash, or one image of each hash of a pair."""
    pairs = con.execute(f"""
        SELECT a, b, d FROM (SELECT phash AS a, phash AS b, 0 AS d, n FROM pool_phash WHERE n > 1
                             UNION ALL SELECT a, b, bit_count(xor(a, b)) AS d, 0 AS n FROM pool_pairs)
        ORDER BY d, n DESC, a, b LIMIT {POOL_EXAMPLES}""").fetchall()
    if not pairs:
        return []
    wanted = ", ".join(f"{int(h)}::UBIGINT" for h in {h for a, b, _ in pairs for h in (a, b)})
    rows: dict[int, list[tuple[int, int, int]]] = {}
    for h, shard, index, content in con.execute(f"""
            SELECT phash, shard, "index", content_hash FROM (
                SELECT *, row_number() OVER (PARTITION BY phash ORDER BY shard, "index") AS k
                FROM ({pool}) WHERE phash IN ({wanted})) WHERE k <= 2 ORDER BY phash, k""").fetchall():
        rows.setdefault(int(h), []).append((int(shard), int(index), int(content)))
    chosen = [(rows[int(a)][0], rows[int(b)][1] if a == b else rows[int(b)][0], int(d)) for a, b, d in pairs]
    keys = _keys(store, {(s, i) for x, y, _ in chosen for s, i, _ in (x, y)})
    return [{"key": keys.get(x[:2]), "other": keys.get(y[:2]), "distance": d, "exact": x[2] == y[2]}
            for x, y, d in chosen]
