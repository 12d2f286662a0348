"""curate fetch vs img2dataset: same URL list, same local server with latency, one run.

    python benchmarks/download_vs_img2dataset.py [--rows 10000] [--latency-ms 80] [--repeat 3]

Both download, resize to 256 (border) and write WebDataset shards. img2dataset runs with
2 processes x 64 threads; curate runs `curate fetch` with its other stages off (see STAGES_OFF), on
the in-process DirectRunner. Prints samples/s, the ratio, and the peak RSS of each process tree;
with --repeat N, N alternating rounds and the round with the median ratio (this machine is shared:
single rounds vary by +-20%).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import REPO, BenchServer, photo_like, run_measured


# What img2dataset does not do is switched off: CLIP scoring, language ID (caption cleaning and
# rules still run) and the near-dedup descriptor (sha256 and the ledger's pHash are still computed).
# Every URL is on one host here, and img2dataset has no per-host limit: ours is raised to the same
# total concurrency so that politeness does not cap a single-host benchmark.
STAGES_OFF = ["--set", "clip_enabled=false", "--set", "langid_backend=none", "--set", "dedup_near=false",
              "--set", "per_host_concurrency=128"]


def make_images(files: Path, count: int) -> None:
    files.mkdir(parents=True, exist_ok=True)
    sizes = [(1024, 768), (800, 600), (1280, 960), (640, 480), (1200, 800)]
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        photo_like(width, height, index).save(files / f"img_{index:03d}.jpg", quality=90)


def write_rows(path: Path, base_url: str, rows: int, images: int) -> None:
    from pipeline.synthetic import all_attributes

    captions = [attrs.caption() for attrs in all_attributes()]  # alt-text style English captions
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for index in range(rows):  # distinct urls, served from a pool of images
            writer.writerow([f"{base_url}/files/img_{index % images:03d}.jpg?n={index}", captions[index % len(captions)]])


def count_tar_samples(pattern: str) -> int:
    import tarfile

    total = 0
    for path in glob.glob(pattern):
        with tarfile.open(path) as archive:
            total += sum(1 for m in archive.getmembers() if m.name.endswith(".jpg"))
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=80.0)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (img2dataset, curate); the median is reported")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--curate-args", default="", help="extra args for curate fetch, e.g. Beam options")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_download_"))
    root = work / "server"
    make_images(root / "files", args.images)
    server = BenchServer(root, args.latency_ms)
    try:
        rows = work / "rows.csv"
        write_rows(rows, server.base_url, args.rows, args.images)
        bin_dir = Path(sys.executable).parent
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))

        runs = []
        for round_index in range(args.repeat):  # A B A B ...: a drifting machine hits both alike
            out_i2d = work / "img2dataset_out"
            shutil.rmtree(out_i2d, ignore_errors=True)
            i2d = run_measured(
                [str(bin_dir / "img2dataset"), "--url_list", str(rows), "--input_format", "csv", "--url_col", "url",
                 "--caption_col", "caption", "--output_folder", str(out_i2d), "--processes_count", "2",
                 "--thread_count", "64", "--image_size", "256", "--resize_mode", "border", "--output_format",
                 "webdataset", "--number_sample_per_shard", "1000", "--timeout", "20", "--retries", "0"],
                env=env, cwd=work,
            )
            i2d_ok = count_tar_samples(f"{out_i2d}/*.tar")

            out_curate = work / "curate_out"
            shutil.rmtree(out_curate, ignore_errors=True)
            curate = run_measured(
                [sys.executable, "-m", "pipeline.cli", "fetch", "--input", str(rows), "--output", str(out_curate),
                 "--allow-host", f"127.0.0.1:{server.port}", "--set", "image_size=256", "--set", "resize_mode=border",
                 "--set", "retries=0", "--quiet"] + STAGES_OFF + args.curate_args.split(),
                env=env, cwd=REPO,
            )
            curate_ok = count_tar_samples(f"{out_curate}/raw/*.tar")
            runs.append((i2d, i2d_ok, curate, curate_ok))
            if args.repeat > 1:
                print(f"round {round_index + 1}: img2dataset {i2d_ok / i2d['seconds']:.1f} samples/s, curate "
                      f"{curate_ok / curate['seconds']:.1f} samples/s, ratio "
                      f"{(curate_ok / curate['seconds']) / (i2d_ok / i2d['seconds']):.2f}x", flush=True)
    finally:
        server.close()

    # the round with the median ratio is reported in full; every round's ratio is printed above
    runs.sort(key=lambda r: (r[3] / r[2]["seconds"]) / (r[1] / r[0]["seconds"]))
    i2d, i2d_ok, curate, curate_ok = runs[len(runs) // 2]
    results = {
        "rows": args.rows, "latency_ms": args.latency_ms, "rounds": len(runs),
        "img2dataset": {"ok": i2d_ok, "seconds": round(i2d["seconds"], 2),
                        "samples_per_s": round(i2d_ok / i2d["seconds"], 1), "peak_rss_mb": round(i2d["peak_rss_mb"])},
        "curate": {"ok": curate_ok, "seconds": round(curate["seconds"], 2),
                   "samples_per_s": round(curate_ok / curate["seconds"], 1), "peak_rss_mb": round(curate["peak_rss_mb"])},
    }
    results["throughput_ratio_curate_over_img2dataset"] = round(
        results["curate"]["samples_per_s"] / max(results["img2dataset"]["samples_per_s"], 1e-9), 2
    )
    results["all_round_ratios"] = sorted(
        round((r[3] / r[2]["seconds"]) / (r[1] / r[0]["seconds"]), 2) for r in runs
    )
    print(f"{'tool':<12} {'ok':>7} {'seconds':>9} {'samples/s':>10} {'peak RSS MB':>12}")
    for tool in ("img2dataset", "curate"):
        r = results[tool]
        print(f"{tool:<12} {r['ok']:>7} {r['seconds']:>9.1f} {r['samples_per_s']:>10.1f} {r['peak_rss_mb']:>12}")
    print(f"throughput ratio curate / img2dataset: {results['throughput_ratio_curate_over_img2dataset']:.2f}x")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
