"""Web scale on one machine: `curate decide` and `curate write` on 100k to 10M rows, `curate fetch`
on 100k and 1M rows; seconds, rows/s and peak RSS of the whole process tree, growth ratios, recall
of the hard negatives against exact search, and today's code side by side.

    python benchmarks/scale.py [--rows 100000,1000000,10000000] [--fetch-rows 100000,1000000]
                               [--baseline-ref REF] [--baseline-rows 100000] [--work DIR]
                               [--keep-share 1.0] [--recall-queries 1000] [--compare-rows 50000]
                               [--phases decide,write]

Features tables are cloned from a real small run (the demo corpus fetched with the tiny CLIP: real
descriptors, real raw images) the way DataComp-scale pools look to the decide phase:
- every row a template survivor with a fresh uid, url, sha256, pHashes and descriptor hash words
  (random 64-bit values: dedup finds few false candidates, as in real data with many distinct
  pictures; the thumbnails stay the template's, so verification has real work);
- CLIP embeddings with the structure real ones have (not uniform noise, on which no sublinear
  neighbour search can find anything): a shared direction, Zipf-sized topics, sub-topics, and
  per-sample noise; image and text share topic and sub-topic, each in a basis of its own. Random
  pairs are at cosine ~0.25, same topic ~0.55, same sub-topic ~0.8;
- captions from the topic's and sub-topic's words (the hard-negative lexicon's objects and
  attributes, so caption negatives do real work) plus per-row details: mostly distinct;
- 2% planted near-copies (a row's descriptor and pHashes with up to 3 bits flipped per hash, its
  image embedding at cosine ~0.95-0.99) and 0.5% exact copies (same sha256 and features);
- CLIP scores ~ N(0.3, 0.05); --keep-share sets the threshold so that share of rows passes
  (1.0: every row passes, the heaviest case for both phases).

The baseline (--baseline-ref, default the commit before the columnar phases) runs from a git
worktree on a copy of the same features. `--compare-rows N` also runs both codes' decide on an
N-row table and compares the decisions uid by uid.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import REPO, BenchServer, run_measured

from schemas import FEATURES_SCHEMA, Col, Status  # noqa: E402
from transforms.dedup import DESCRIPTOR_BYTES  # noqa: E402
from transforms.write_output import parquet_writer  # noqa: E402

DIM = 512
TOPICS = 4096
SUBTOPICS = 16
NEAR_SHARE, EXACT_SHARE = 0.02, 0.005
ROWS_PER_FILE = 500_000
ROW_GROUP = 3500  # about what WriteToParquet's 8 MB buffer holds of these rows
BASELINE_REF = "160099e"
TINY = ["--set", "clip_model=tiny_clip", "--set", f"clip_checkpoint={REPO / 'pipeline/assets/tiny_clip.pt'}"]
# descriptor hash words: 3 views x 4 words of 8 bytes, from byte 13 (transforms/dedup.py layout v5)
_HASH_WORDS = [13 + 8 * w for w in range(12)]


def env_for(checkout: Path) -> dict:
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(checkout))


# ---------------------------------------------------------------------------------------------
# the seed: a real small run
# ---------------------------------------------------------------------------------------------


def seed_run(work: Path) -> Path:
    out = work / "seed"
    if (out / "run" / "fetch.json").exists():
        return out
    corpus = work / "seed_corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    server = BenchServer(corpus, 0)
    try:
        subprocess.run([sys.executable, "-m", "pipeline.demo", "corpus", "--root", str(corpus), "--base-url", server.base_url],
                       check=True, env=env_for(REPO), cwd=REPO, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "fetch", "--input", str(corpus / "rows.csv"), "--output", str(out),
                        "--allow-host", f"127.0.0.1:{server.port}", "--set", "request_deadline_s=5", "--quiet"] + TINY,
                       check=True, env=env_for(REPO), cwd=REPO)
    finally:
        server.close()
    return out


def templates(seed: Path) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(seed / "features" / "*.parquet")))])
    alive = table.filter(pa.compute.equal(table[Col.STATUS], Status.KEPT))
    lengths = pa.compute.binary_length(alive[Col.DEDUP_DESCRIPTOR]).to_numpy(zero_copy_only=False)
    return alive.filter(pa.array(lengths == DESCRIPTOR_BYTES))


# ---------------------------------------------------------------------------------------------
# cloned features
# ---------------------------------------------------------------------------------------------


def _hex(raw: np.ndarray) -> pa.Array:
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((raw.shape[0], raw.shape[1] * 2), dtype=np.uint8)
    chars[:, 0::2] = digits[raw >> 4]
    chars[:, 1::2] = digits[raw & 15]
    return pa.array(chars.view(f"S{chars.shape[1]}").ravel()).cast(pa.string())


class Space:
    """Structured embeddings of one space: a shared direction + topic + sub-topic + noise, and in
    the "graded" kind (default) a style: a point in a 16-d subspace shared by all topics, so that
    neighbours inside a sub-topic are nearer or farther by how alike their styles are (real CLIP
    neighbourhoods fall off gradually). The "plateau" kind has no style: every sub-topic mate is
    at ~0.8 and every topic mate at ~0.55 within noise, flat neighbourhoods in which the exact
    top 3 are decided by noise (the hardest case for any partitioned search)."""

    STYLE_DIMS = 16

    def __init__(self, seed: int, kind: str = "graded"):
        rng = np.random.default_rng(seed)
        self.mean = _unit(rng.standard_normal(DIM)).astype(np.float32)
        self.topics = _unit(rng.standard_normal((TOPICS, DIM)).astype(np.float32))
        self.subtopics = _unit(rng.standard_normal((TOPICS * SUBTOPICS, DIM)).astype(np.float32))
        self.style = np.linalg.qr(rng.standard_normal((DIM, self.STYLE_DIMS)))[0].T.astype(np.float32)
        weights = (0.25, 0.30, 0.25, 0.0, 0.20) if kind == "plateau" else (0.20, 0.25, 0.20, 0.20, 0.15)
        self.scales = np.sqrt(np.asarray(weights, dtype=np.float32))

    def vectors(self, topic: np.ndarray, sub: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = _unit(rng.standard_normal((len(topic), DIM)).astype(np.float32))
        style = _unit(rng.standard_normal((len(topic), self.STYLE_DIMS)).astype(np.float32)) @ self.style
        a, b, c, e, d = self.scales
        x = (a * self.mean[None, :] + b * self.topics[topic] + c * self.subtopics[topic * SUBTOPICS + sub]
             + e * style + d * noise)
        return _unit(x).astype(np.float16)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _words() -> tuple[list, list]:
    lexicon = json.loads((REPO / "transforms" / "data" / "negatives_lexicon.json").read_text())
    objects = sorted({w for words in lexicon["objects"].values() for w in words})
    attributes = sorted({w for words in lexicon["attributes"].values() for w in words})
    return objects, attributes


_PREPOSITIONS = ["on", "next to", "under", "behind", "near", "in front of", "beside", "with"]
_DETAILS = ["at sunset", "in the rain", "close-up", "stock photo", "top view", "vintage", "in the city",
            "on a white background", "for sale", "illustration", "in the garden", "at night", "studio shot",
            "hd wallpaper", "free download", "on the beach", "in winter", "watercolor", "3d render", "photo"]


def captions_for(topic: np.ndarray, sub: np.ndarray, rng: np.random.Generator) -> list[str]:
    objects, attributes = _words()
    o1 = (topic * 7919) % len(objects)
    a1 = (topic * 104729 + sub * 31) % len(attributes)
    o2 = (topic * 31 + sub * 7 + rng.integers(0, 3, len(topic))) % len(objects)
    a2 = rng.integers(0, len(attributes), len(topic))
    prep = (sub + topic) % len(_PREPOSITIONS)
    detail = rng.integers(0, len(_DETAILS), len(topic))
    number = rng.integers(1, 5000, len(topic))
    return [f"a {attributes[w]} {objects[x]} {_PREPOSITIONS[p]} a {attributes[y]} {objects[z]} {_DETAILS[d]} {n}"
            for w, x, p, y, z, d, n in zip(a1.tolist(), o1.tolist(), prep.tolist(), a2.tolist(), o2.tolist(),
                                           detail.tolist(), number.tolist())]


def _flip_bits(words: np.ndarray, rng: np.random.Generator, most: int = 3) -> np.ndarray:
    out = words.copy()
    for _ in range(most):
        bit = rng.integers(0, 64, len(words)).astype(np.uint64)
        flip = rng.random(len(words)) < 0.7
        out = np.where(flip, out ^ (np.uint64(1) << bit), out)
    return out


def build_features(seed: Path, rows: int, out: Path, chunk: int = ROWS_PER_FILE, keep_share: float = 1.0,
                   kind: str = "graded") -> dict:
    """`rows` cloned feature rows in out/features (+ out/raw linked to the seed's images)."""
    marker = out / "features.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(out, ignore_errors=True)
    (out / "features").mkdir(parents=True)
    (out / "raw").symlink_to((seed / "raw").resolve())
    (out / "run").mkdir()
    template = templates(seed)
    t_desc = np.frombuffer(b"".join(template[Col.DEDUP_DESCRIPTOR].to_pylist()), dtype=np.uint8).reshape(-1, DESCRIPTOR_BYTES)
    image_space, text_space = Space(1, kind), Space(2, kind)
    topic_p = 1.0 / (np.arange(TOPICS) + 10.0) ** 1.1
    topic_p /= topic_p.sum()
    started = time.monotonic()
    planted = {"near": 0, "exact": 0}
    planted_pairs: dict[str, list] = {"near": [], "exact": []}
    for index, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        rng = np.random.default_rng(10_000 + index)
        t = rng.integers(0, template.num_rows, n)
        base = template.take(pa.array(t))
        topic = rng.choice(TOPICS, n, p=topic_p)
        sub = rng.integers(0, SUBTOPICS, n)
        images = image_space.vectors(topic, sub, rng)
        texts = text_space.vectors(topic, sub, rng)
        desc = t_desc[t].copy()
        hashes = rng.integers(0, 2**64, (n, 12), dtype=np.uint64)
        phash = rng.integers(0, 2**64, (n, 2), dtype=np.uint64)
        sha = rng.integers(0, 256, (n, 32), dtype=np.uint8)
        uid = _hex(rng.integers(0, 256, (n, 16), dtype=np.uint8)).to_pylist()
        # planted copies of earlier rows of the chunk
        draw = rng.random(n)
        near = np.flatnonzero((draw < NEAR_SHARE) & (np.arange(n) > 0))
        exact = np.flatnonzero((draw >= NEAR_SHARE) & (draw < NEAR_SHARE + EXACT_SHARE) & (np.arange(n) > 0))
        for rows_of, is_exact in ((near, False), (exact, True)):
            if not len(rows_of):
                continue
            source = (rng.random(len(rows_of)) * rows_of).astype(np.int64)
            planted_pairs["exact" if is_exact else "near"] += [(uid[a], uid[b]) for a, b in zip(rows_of.tolist(), source.tolist())]
            t[rows_of] = t[source]
            desc[rows_of] = desc[source]
            if is_exact:
                hashes[rows_of], phash[rows_of], sha[rows_of] = hashes[source], phash[source], sha[source]
                images[rows_of] = images[source]
            else:
                hashes[rows_of] = np.stack([_flip_bits(hashes[source, w], rng) for w in range(12)], axis=1)
                phash[rows_of] = np.stack([_flip_bits(phash[source, w], rng) for w in range(2)], axis=1)
                step = rng.uniform(0.1, 0.3, len(rows_of)).astype(np.float32)[:, None]
                noisy = images[source].astype(np.float32) + step * _unit(rng.standard_normal((len(rows_of), DIM))).astype(np.float32)
                images[rows_of] = _unit(noisy).astype(np.float16)
        planted["near"] += len(near)
        planted["exact"] += len(exact)
        base = template.take(pa.array(t))
        for w, offset in enumerate(_HASH_WORDS):
            desc[:, offset:offset + 8] = hashes[:, w].astype(">u8").view(np.uint8).reshape(n, 8)
        uid = pa.array(uid, pa.string())
        captions = pa.array(captions_for(topic, sub, rng))
        urls = pa.compute.binary_join_element_wise(
            pa.array([f"https://img{i % 997}.example.com/" for i in range(start, start + n)]), uid, ".jpg", "")
        phash_hex = [_hex(phash[:, w:w + 1].astype(">u8").view(np.uint8).reshape(n, 8)) for w in range(2)]
        columns = {name: base[name] for name in FEATURES_SCHEMA.names if name in base.column_names}
        columns.update({
            Col.UID: uid, Col.SOURCE_FILE: pa.array(["scale.parquet"] * n), Col.SOURCE_ROW: pa.array(np.arange(start, start + n)),
            Col.URL: urls, Col.FINAL_URL: urls, Col.CAPTION: captions, Col.CAPTION_CLEAN: captions, Col.EXTRA: pa.nulls(n, pa.string()),
            Col.SHA256: _hex(sha), Col.PHASH: phash_hex[0], Col.PHASH_MIRROR: phash_hex[1],
            Col.DEDUP_DESCRIPTOR: pa.array(desc.view(f"S{DESCRIPTOR_BYTES}").ravel(), pa.binary(DESCRIPTOR_BYTES)).cast(pa.binary()),
            Col.LANG: pa.array(["en"] * n), Col.LANG_SCORE: pa.array(np.full(n, 0.9, np.float32)),
            Col.CLIP_SCORE: pa.array(rng.normal(0.3, 0.05, n).astype(np.float32)),
            Col.IMAGE_EMBEDDING: pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32)),
                                                          pa.array(images.reshape(-1), pa.float16())),
            Col.TEXT_EMBEDDING: pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32)),
                                                         pa.array(texts.reshape(-1), pa.float16())),
        })
        table = pa.table({name: columns[name] for name in FEATURES_SCHEMA.names}).cast(FEATURES_SCHEMA)
        with open(out / "features" / f"survivors-{index:05d}.parquet", "wb") as handle:
            with parquet_writer(handle, FEATURES_SCHEMA) as writer:  # as the fetch phase writes it
                writer.write_table(table, row_group_size=ROW_GROUP)
    threshold = float(np.quantile(np.random.default_rng(0).normal(0.3, 0.05, 200_000), 1.0 - keep_share)) if keep_share < 1 else -1.0
    shutil.copy(seed / "run" / "fetch.json", out / "run" / "fetch.json")
    info = {"rows": rows, "planted": planted, "embeddings": kind, "seconds": round(time.monotonic() - started, 1), "clip_threshold": threshold,
            "bytes": sum(f.stat().st_size for f in (out / "features").glob("*.parquet"))}
    (out / "planted.json").write_text(json.dumps(planted_pairs))
    marker.write_text(json.dumps(info))
    return info


def planted_found(source: Path, out: Path) -> dict:
    """Share of the planted (copy, original) pairs the decide phase put in one duplicate cluster
    (both end with the same survivor), per kind."""
    planted = json.loads((source / "planted.json").read_text())
    decisions = pa.concat_tables([pq.read_table(f, columns=[Col.UID, Col.REASON, Col.DUPLICATE_OF])
                                  for f in sorted(glob.glob(str(out / "decisions" / "*.parquet")))])
    survivor = {uid: (of if reason in ("duplicate_near", "duplicate_exact") else uid)
                for uid, reason, of in zip(decisions[Col.UID].to_pylist(), decisions[Col.REASON].to_pylist(),
                                           decisions[Col.DUPLICATE_OF].to_pylist())}
    found = {}
    for kind, pairs in planted.items():
        together = sum(survivor.get(a, a) == survivor.get(b, b) for a, b in pairs)
        found[kind] = round(together / len(pairs), 4) if pairs else None
    return found


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # removed while counted
                pass
    return total


class _DiskPeak:
    """The largest size the phase's work folder (its spilled shuffles) reaches, sampled every second:
    with the features, what a run needs on disk."""

    def __init__(self, folder: Path):
        import threading

        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, _folder_bytes(self.folder))

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_phase(out: Path, phase: str, checkout: Path, extra: list[str], timeout: float = 6 * 3600) -> dict:
    command = [sys.executable, "-m", "pipeline.cli", phase, "--output", str(out), "--quiet"] + extra
    disk = _DiskPeak(out / "work")
    try:
        measured = run_measured(command, env=env_for(checkout), cwd=checkout, timeout=timeout)
    finally:
        work_bytes = disk.close()
    info = json.loads((out / "run" / f"{phase}.json").read_text())
    return {"seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"], "passes": info.get("passes", []),
            "metrics": info.get("metrics", {}), "peak_work_mb": work_bytes / 2**20}


def config_args(info: dict) -> list[str]:
    return ["--set", f"clip_threshold={info['clip_threshold']}"]


def copy_features(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "features").symlink_to((source / "features").resolve())
    (target / "raw").symlink_to((source / "raw").resolve())
    (target / "run").mkdir()
    shutil.copy(source / "run" / "fetch.json", target / "run" / "fetch.json")


def baseline_checkout(work: Path, ref: str) -> Path:
    checkout = work / f"baseline-{ref}"
    if not checkout.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), ref], check=True,
                       stdout=subprocess.DEVNULL)
    return checkout


# ---------------------------------------------------------------------------------------------
# quality: decisions compared, recall of the negatives
# ---------------------------------------------------------------------------------------------


def _decisions(out: Path) -> dict:
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(str(out / "decisions" / "*.parquet")))])
    return {row[Col.UID]: row for row in table.to_pylist()}


def compare_decisions(a: Path, b: Path) -> dict:
    left, right = _decisions(a), _decisions(b)
    differing = {key: 0 for key in (Col.STATUS, Col.REASON, Col.DUPLICATE_OF, Col.HARD_NEGATIVES)}
    for uid in set(left) | set(right):
        x, y = left.get(uid), right.get(uid)
        for key in differing:
            if x is None or y is None or x[key] != y[key]:
                differing[key] += 1
    return {"uids": len(set(left) | set(right)), "differing": differing}


def negatives_recall(out: Path, queries: int, k: int = 3, ceiling: float = 0.95, radius: int = 8) -> dict:
    """recall@k of the image and text neighbours in the decisions against an exact search with
    the same skip rules over every kept sample, on `queries` kept samples (smallest uid hashes)."""
    from transforms import neighbours as nn

    decisions = pa.concat_tables([pq.read_table(f, columns=[Col.UID, Col.STATUS, Col.HARD_NEGATIVES])
                                  for f in sorted(glob.glob(str(out / "decisions" / "*.parquet")))])
    kept = decisions.filter(pa.compute.equal(decisions[Col.STATUS], Status.KEPT))
    kept_uids = set(kept[Col.UID].to_pylist())
    columns = [Col.UID, Col.PHASH, Col.PHASH_MIRROR, Col.CAPTION_CLEAN, Col.IMAGE_EMBEDDING, Col.TEXT_EMBEDDING]
    features = pa.concat_tables([pq.read_table(f, columns=columns) for f in sorted(glob.glob(str(out / "features" / "*.parquet")))])
    features = features.filter(pa.compute.is_in(features[Col.UID], value_set=pa.array(sorted(kept_uids))))
    features = features.sort_by([(Col.UID, "ascending")])
    uids = features[Col.UID].to_pylist()
    caption_ids = np.array([nn.caption_id(c or "") for c in features[Col.CAPTION_CLEAN].to_pylist()], dtype=np.uint64)
    from transforms.batch import hex_prefix_uint64

    hashes = np.stack([hex_prefix_uint64(features[Col.PHASH].combine_chunks())[0],
                       hex_prefix_uint64(features[Col.PHASH_MIRROR].combine_chunks())[0]], axis=1)
    present = np.stack([features[Col.PHASH].is_valid().to_numpy(zero_copy_only=False),
                        features[Col.PHASH_MIRROR].is_valid().to_numpy(zero_copy_only=False)], axis=1)
    order = np.argsort([int(hashlib.sha256(u.encode()).hexdigest()[:15], 16) for u in uids])[:queries]
    # the mined lists of the queries only: a million rows of nested lists as Python objects
    # would cost tens of GB
    asked = kept.filter(pa.compute.is_in(kept[Col.UID], value_set=pa.array([uids[q] for q in order.tolist()])))
    mined = {row[Col.UID]: row[Col.HARD_NEGATIVES] or [] for row in asked.to_pylist()}
    del kept, decisions
    result = {}
    for space, column in (("image", Col.IMAGE_EMBEDDING), ("text", Col.TEXT_EMBEDDING)):
        flat = features[column].combine_chunks()
        values = flat.flatten().to_numpy(zero_copy_only=False).reshape(len(uids), -1)
        units, _ = nn.unit_rows(values, np.ones(len(uids), dtype=bool))
        pool = nn.Pool(nn.search_vectors(units), caption_ids, hashes, present)
        found, _ = nn.group_neighbours(pool, order, k, ceiling, radius)
        hits = total = 0
        for query, exact in zip(order.tolist(), found.tolist()):
            truth = {uids[j] for j in exact if j >= 0}
            got = {n[Col.NEGATIVE_UID] for n in mined[uids[query]] if n[Col.NEGATIVE_KIND] == space}
            hits += len(truth & got)
            total += len(truth)
        result[space] = round(hits / total, 4) if total else None
    return result


# ---------------------------------------------------------------------------------------------
# fetch memory
# ---------------------------------------------------------------------------------------------


def fetch_inputs(work: Path, rows: int, base_url: str) -> Path:
    path = work / f"fetch-{rows}.csv"
    if not path.exists():
        objects, attributes = _words()
        with open(path, "w") as handle:
            handle.write("url,caption\n")
            for i in range(rows):
                n = i - 1 if i % 100 == 99 else i  # 1% repeated input rows
                caption = f"a {attributes[n % len(attributes)]} {objects[(n // 7) % len(objects)]} picture number {n}"
                handle.write(f"{base_url}/files/img_{n % 64:02d}.jpg?n={n},{caption}\n")
    return path


def fetch_corpus(root: Path) -> None:
    from PIL import Image

    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(64):
        pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC).save(files / f"img_{i:02d}.jpg", quality=85)


def run_fetch(work: Path, rows: int, checkout: Path) -> dict:
    root = work / "fetch_corpus"
    fetch_corpus(root)
    server = BenchServer(root, 1.0)
    try:
        path = fetch_inputs(work, rows, server.base_url)
        out = work / f"fetch-out-{rows}-{checkout.name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "pipeline.cli", "fetch", "--input", str(path), "--output", str(out),
                   "--allow-host", f"127.0.0.1:{server.port}", "--set", "clip_enabled=false", "--set", "retries=0",
                   "--set", "per_host_concurrency=128", "--quiet"]
        measured = run_measured(command, env=env_for(checkout), cwd=checkout, timeout=3 * 3600)
    finally:
        server.close()
    # a run whose downloads failed is fast and says nothing: count what came back
    reasons = pq.read_table(out / "features", columns=[Col.REASON])[Col.REASON].value_counts().to_pylist()
    outcome = {str(entry["values"]): entry["counts"] for entry in reasons}
    if sum(outcome.values()) != rows or outcome.get("None", 0) < 0.95 * rows:
        raise RuntimeError(f"fetch of {rows} rows by {checkout}: unexpected outcome {outcome}")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"], "outcome": outcome}


# ---------------------------------------------------------------------------------------------


def _phase_list(text: str) -> list:
    """--phases: a comma-separated subset of decide,write (a typo would otherwise measure nothing)."""
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in ("decide", "write")]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"{text!r}: give decide, write or decide,write")
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,10000000")
    parser.add_argument("--fetch-rows", default="100000,1000000")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--compare-rows", type=int, default=0)
    parser.add_argument("--keep-share", type=float, default=1.0)
    parser.add_argument("--embeddings", default="graded", choices=["graded", "plateau"])
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--recall-max-rows", type=int, default=1_000_000)
    parser.add_argument("--work", default="/tmp/curate-scale")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--phases", default="decide,write", type=_phase_list, help="the phases run at each size (decide,write)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seed = seed_run(work)
    results = {"rows": {}, "fetch": {}}
    sizes = [int(r) for r in args.rows.split(",") if r]
    baseline = baseline_checkout(work, args.baseline_ref) if args.baseline_rows or args.compare_rows else None

    if args.compare_rows:
        info = build_features(seed, args.compare_rows, work / f"features-{args.compare_rows}", keep_share=args.keep_share,
                              kind=args.embeddings)
        ours, theirs = work / "compare-ours", work / "compare-baseline"
        for out, checkout in ((ours, REPO), (theirs, baseline)):
            copy_features(work / f"features-{args.compare_rows}", out)
            run_phase(out, "decide", checkout, config_args(info))
        results["compare"] = dict(rows=args.compare_rows, **compare_decisions(ours, theirs))
        print(f"decisions at {args.compare_rows:,} rows, ours vs baseline: {results['compare']}", flush=True)

    for rows in sizes:
        source = work / f"features-{rows}-{args.embeddings}"
        info = build_features(seed, rows, source, keep_share=args.keep_share, kind=args.embeddings)
        print(f"{rows:,} rows: features built ({info['bytes'] / 2**30:.1f} GiB, planted {info['planted']})", flush=True)
        entry = {"features_gib": round(info["bytes"] / 2**30, 2)}
        runs = [("ours", REPO)] + ([("baseline", baseline)] if baseline is not None and rows <= args.baseline_rows else [])
        for name, checkout in runs:
            out = work / f"out-{rows}-{name}"
            copy_features(source, out)
            for phase in [p for p in ("decide", "write") if p in args.phases]:
                measured = run_phase(out, phase, checkout, config_args(info))
                entry[f"{name}_{phase}"] = measured
                print(f"{rows:,} rows, {name} {phase}: {measured['seconds']:.0f} s, {rows / measured['seconds']:,.0f} rows/s, "
                      f"peak RSS {measured['peak_rss_mb']:,.0f} MB, work folder up to {measured['peak_work_mb']:,.0f} MB",
                      flush=True)
                if name == "ours":
                    for record in measured["passes"]:
                        print(f"    {record['pass']:12s} {record['seconds']:8.1f} s  {record.get('peak_rss_mb')} MB", flush=True)
            entry[f"{name}_planted_found"] = planted_found(source, out)
            print(f"    planted copies dropped as duplicates: {entry[f'{name}_planted_found']}", flush=True)
            if name == "ours":
                # decide's own estimate (negatives_recall_queries sampled queries against its exact search)
                from pipeline.report import negatives_recall as estimated_recall

                entry["recall_estimated_by_decide"] = estimated_recall(entry["ours_decide"]["metrics"])
                print(f"    recall@3 estimated by decide: {entry['recall_estimated_by_decide']}", flush=True)
            if name == "ours" and rows <= args.recall_max_rows and args.recall_queries:
                entry["recall"] = negatives_recall(out, args.recall_queries)
                print(f"    recall@3 of the negatives (this benchmark's exact search): {entry['recall']}", flush=True)
            entry[f"{name}_bytes_out"] = sum(f.stat().st_size for d in ("decisions", "ledger", "shards")
                                             for f in (out / d).glob("*") if f.is_file())
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
        results["rows"][rows] = entry
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))

    for rows in [int(r) for r in args.fetch_rows.split(",") if r]:
        results["fetch"][rows] = {"ours": run_fetch(work, rows, REPO)}
        if baseline is not None and rows <= args.baseline_rows:
            results["fetch"][rows]["baseline"] = run_fetch(work, rows, baseline)
        print(f"fetch {rows:,} rows: {results['fetch'][rows]}", flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("\n| rows | phase | code | seconds | rows/s | peak RSS (MB) | work folder (MB) |")
    print("|---|---|---|---|---|---|---|")
    for rows, entry in results["rows"].items():
        for phase in ("decide", "write"):
            for name in ("ours", "baseline"):
                m = entry.get(f"{name}_{phase}")
                if m:
                    print(f"| {int(rows):,} | {phase} | {name} | {m['seconds']:.0f} | {int(rows) / m['seconds']:,.0f} | "
                          f"{m['peak_rss_mb']:,.0f} | {m.get('peak_work_mb', 0):,.0f} |")
    sizes = sorted(int(r) for r in results["rows"])
    for phase in ("decide", "write"):
        for small, big in zip(sizes, sizes[1:]):
            a, b = results["rows"][small].get(f"ours_{phase}"), results["rows"][big].get(f"ours_{phase}")
            if a and b:
                print(f"{phase}: {big:,} vs {small:,} rows: time x{b['seconds'] / a['seconds']:.2f}, "
                      f"peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
    fetch = sorted((int(r), v) for r, v in results["fetch"].items())
    for (small, a), (big, b) in zip(fetch, fetch[1:]):
        print(f"fetch: {big:,} vs {small:,} rows: peak RSS x{b['ours']['peak_rss_mb'] / a['ours']['peak_rss_mb']:.2f} "
              f"({a['ours']['peak_rss_mb']:,.0f} -> {b['ours']['peak_rss_mb']:,.0f} MB)")


if __name__ == "__main__":
    sys.exit(main())
