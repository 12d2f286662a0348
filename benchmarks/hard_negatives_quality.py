"""Quality of mined hard negatives on the synthetic captioned set (shapes x colours x backgrounds).

    python benchmarks/hard_negatives_quality.py [--count 1000]

Embeds `count` synthetic samples (128 px JPEGs, held-out render seed) with the project's tiny CLIP
(pipeline/tiny_clip.py; the shipped checkpoint, or one trained into a temp folder if none is
shipped yet), runs `curate decide` on them (mining only: dedup off, every pair passes the CLIP
filter) and prints:
  - how many of (shape, colour, background) a mined image negative shares with its anchor, against
    random other samples (the same number per anchor, seeded);
  - near-duplicates among the negatives (pHash or mirrored pHash within dedup_radius, or image
    cosine above negatives_ceiling): must be 0;
  - caption negatives equal to their source caption: must be 0; and their count per kind.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RENDER_SEED = 5  # neither the tiny CLIP's training seed (1) nor its held-out seed (2)


def mine(records: list[dict], folder: Path) -> dict:
    """`curate decide` on the records as a features table -> {uid: hard negatives}."""
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import FEATURES_SCHEMA, Col, Status, to_table

    (folder / "features").mkdir(parents=True)
    rows = [dict(r, **{Col.STATUS: Status.KEPT}) for r in records]
    pq.write_table(to_table(rows, FEATURES_SCHEMA), folder / "features" / "survivors.parquet")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "decide", "--output", str(folder), "--quiet",
                    "--set", "clip_threshold=-1", "--set", "dedup_exact=false", "--set", "dedup_near=false"],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    decisions = pa.concat_tables([pq.read_table(f) for f in sorted((folder / "decisions").glob("*.parquet"))])
    return {row[Col.UID]: row[Col.HARD_NEGATIVES] or [] for row in decisions.to_pylist()}


def _near(a: dict, b: dict, radius: int) -> bool:
    """A pHash (or mirror) of a within `radius` bits of one of b's: a near-duplicate, not a negative."""
    mine = [int(h, 16) for h in (a["phash"], a["phash_mirror"]) if h]
    theirs = [int(h, 16) for h in (b["phash"], b["phash_mirror"]) if h]
    return bool(a["phash"]) and any(bin(x ^ y).count("1") <= radius for x in mine for y in theirs)


def embed(count: int):
    from PIL import Image

    from pipeline import synthetic
    from pipeline.tiny_clip import DEFAULT_CHECKPOINT, TINY_CLIP_NAME, ensure_tiny_clip
    from transforms.clip_score import ClipInput, load_open_clip
    from transforms.dedup import image_hashes

    if DEFAULT_CHECKPOINT.is_file():
        checkpoint = ensure_tiny_clip()
    else:  # not shipped yet: train one where nobody else's files are
        checkpoint = ensure_tiny_clip(Path(tempfile.gettempdir()) / "negatives_quality" / "tiny_clip.pt")
    model = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision="fp32")
    attrs, records, prepared = [], [], []
    for index, (attributes, image) in enumerate(synthetic.iter_samples(count, size=128, seed=RENDER_SEED)):
        jpeg = synthetic.encode_jpeg(image)
        hashes = image_hashes(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        caption = attributes.caption()
        attrs.append(attributes)
        records.append({"uid": f"{index:032x}", "caption_clean": caption, "phash": hashes.get("phash"),
                        "phash_mirror": hashes.get("phash_mirror")})
        prepared.append(model.prepare(ClipInput(jpeg, caption)))
    images, texts = [], []
    for start in range(0, len(prepared), 64):
        pixels, tokens = zip(*prepared[start:start + 64])
        image_embeddings, text_embeddings = model.embed(pixels, tokens)
        images.append(image_embeddings)
        texts.append(text_embeddings)
    images, texts = np.concatenate(images), np.concatenate(texts)
    for record, image, text in zip(records, images, texts):
        record["image_embedding"] = image.astype(np.float16).tolist()
        record["text_embedding"] = text.astype(np.float16).tolist()
    return checkpoint, attrs, records, images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()

    from pipeline.config import build_config
    from schemas import Col

    started = time.perf_counter()
    checkpoint, attrs, records, images = embed(args.count)
    print(f"embedded {len(records)} synthetic samples with {checkpoint} in {time.perf_counter() - started:.1f} s")
    config = build_config()
    with tempfile.TemporaryDirectory() as tmp:
        result = mine(records, Path(tmp))

    by_uid = {r["uid"]: i for i, r in enumerate(records)}
    no_phash = sum(r["phash"] is None for r in records)

    def shared(a, b) -> list[int]:
        x, y = attrs[a], attrs[b]
        return [x.shape == y.shape, x.colour == y.colour, x.background == y.background]

    rng = random.Random(0)
    mined_shared, random_shared, near_duplicates, same_attributes = [], [], 0, 0
    caption_total = caption_same = 0
    kinds = Counter()
    for uid, negatives in sorted(result.items()):
        anchor = by_uid[uid]
        image_negatives = [n for n in negatives if n[Col.NEGATIVE_KIND] == "image"]
        for negative in image_negatives:
            other = by_uid[negative[Col.NEGATIVE_UID]]
            mined_shared.append(shared(anchor, other))
            same_attributes += all(shared(anchor, other))
            cosine = float(images[anchor] @ images[other])
            near_duplicates += _near(records[anchor], records[other], config.dedup_radius) or (
                cosine > config.negatives_ceiling
            )
            random_other = rng.choice([i for i in range(len(records)) if i != anchor])
            random_shared.append(shared(anchor, random_other))
        for negative in negatives:
            kinds[negative[Col.NEGATIVE_KIND]] += 1
            if negative[Col.NEGATIVE_UID] is None:
                caption_total += 1
                caption_same += negative[Col.NEGATIVE_CAPTION] == records[anchor]["caption_clean"]

    mined_rates = np.mean(mined_shared, axis=0)
    random_rates = np.mean(random_shared, axis=0)
    print(f"anchors {len(result)}, image negatives {len(mined_shared)} (k={config.negatives_k}), "
          f"ceiling {config.negatives_ceiling}, dedup_radius {config.dedup_radius}")
    print(f"attributes shared with the anchor (of 3): mined image negatives {np.sum(mined_rates):.3f}  "
          f"random samples {np.sum(random_rates):.3f}")
    for name, m, r in zip(("shape", "colour", "background"), mined_rates, random_rates):
        print(f"  same {name:<10}: mined {m:.3f}  random {r:.3f}")
    print(f"mined image negatives that share all 3 attributes (same caption): {same_attributes}")
    print(f"samples without a pHash (blank to the hasher): {no_phash}")
    print(f"near-duplicate negatives (pHash within radius or cosine > ceiling): {near_duplicates}")
    print(f"caption negatives: {caption_total}, equal to their source caption: {caption_same}")
    print("negatives per kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
