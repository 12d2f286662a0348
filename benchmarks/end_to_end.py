"""`curate run` end to end: throughput per phase, the bottleneck stage, and memory as rows grow.

    python benchmarks/end_to_end.py [--rows 10000] [--rss-rows 10000,50000] [--latency-ms 80]
                                    [--clip vit-b-32|tiny] [--rss-clip tiny|vit-b-32] [--clip-threads N]

One local server with latency serves distinct photo-like pictures (smooth colour fields plus
grain, 320 to 480 px JPEGs, like small web photos) with English alt-text captions. In one run it
measures:

1. the full pipeline: `curate run` with every stage on (caption rules + language ID, download,
   decode/resize, pHash + near-dedup descriptor, CLIP, dedup, CLIP filter, hard negatives,
   shards, ledger, report), its wall time per phase (run/PHASE.json) and as a whole process;
2. each stage alone, on the same input: download + decode/resize + write (`curate fetch` with the
   other stages off, as in download_vs_img2dataset.py), caption cleaning + language ID, the
   near-dedup descriptor, and CLIP scoring (the pipeline's ClipScoring on the FnApiRunner); the
   decide and write phases are stages of their own already, timed inside the full run;
3. the bottleneck: the stage with the lowest rows/s alone (CLIP on as many pairs as the run has
   rows), and the pipeline's rows/s as a fraction of it (target >= 0.85); with each phase's CPU
   seconds (run/PHASE.json), the ceiling of that fraction on this machine: where every stage
   shares the same cores, the pipeline takes at least its CPU seconds / cores;
4. peak RSS of the whole `curate run` process tree at each of --rss-rows (target: 50k / 10k <= 1.3).

--clip-threads N gives CLIP N inference threads (clip_cpu_threads) both alone and in the pipeline,
so that it has N of the machine's cores and the other stages the rest, as they would beside an
accelerator. With 0 (the default) CLIP takes every core alone, and in the pipeline every other
stage takes its CPU time from it: on a small machine the fraction then measures the CPU the other
stages need (bounded by the printed ceiling) more than how well the pipeline keeps CLIP fed.

--clip picks the model of the throughput part: vit-b-32 (default), a randomly initialised ViT-B-32,
the smallest architecture used for real CLIP filtering, so the real cost of scoring; or tiny, the
shipped tiny checkpoint, ~10x cheaper, which leaves download the bottleneck and every other stage
competing with it for the same cores. --rss-clip picks the model of the memory runs: tiny by
default, since a model's memory does not grow with rows and ViT-B-32 on CPU would take ~40 min
at 50k rows. Neither has weights that understand photos, so the CLIP
filter is switched off (clip_threshold=-1): every pair reaches dedup, negatives and the shards, the
heaviest case for the decide and write phases.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, BenchServer, run_measured
from download_vs_img2dataset import STAGES_OFF

CORES = len(os.sched_getaffinity(0))
NO_CLIP_FILTER = ["--set", "clip_threshold=-1"]
TINY_CLIP = ["--set", "clip_model=tiny_clip", "--set", f"clip_checkpoint={REPO / 'pipeline/assets/tiny_clip.pt'}"]
VIT_CHECKPOINT = "/tmp/e2e_vit_b_32_random.pt"
VIT_CLIP = ["--set", "clip_model=ViT-B-32", "--set", "clip_pretrained=", "--set", f"clip_checkpoint={VIT_CHECKPOINT}"]
SIZES = [(400, 300), (480, 320), (360, 360), (320, 400), (440, 330)]
_SETTINGS = ["in a kitchen", "at the beach", "in the park", "on a desk", "in a classroom", "at night",
             "in the snow", "on a wooden table", "in a garden", "at a market", "in an office", "on the street",
             "in a museum", "near a lake", "in a forest", "at a train station"]
_DETAILS = ["close-up", "wide shot", "high resolution", "stock image", "vintage look", "bright colours",
            "soft light", "top view", "side view", "for a school project", "free download", "minimal style",
            "handmade", "studio shot", "on sale", "illustration"]


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------


def caption_of(index: int) -> str:
    """Alt-text style and mostly distinct, like web captions: subject x setting x detail."""
    from pipeline import synthetic

    combos = synthetic.all_attributes()
    subject = combos[index % len(combos)].caption().replace("a ", "photo of a ", 1)
    setting = _SETTINGS[(index // len(combos)) % len(_SETTINGS)]
    detail = _DETAILS[(index // (len(combos) * len(_SETTINGS))) % len(_DETAILS)]
    return f"{subject} {setting}, {detail}"


def _render(index: int) -> tuple[int, bytes]:
    from common import photo_like

    width, height = SIZES[index % len(SIZES)]
    buffer = io.BytesIO()
    photo_like(width, height, seed=1_000_000 + index).save(buffer, "JPEG", quality=85)
    return index, buffer.getvalue()


def make_corpus(root: Path, count: int) -> list[str]:
    """`count` distinct pictures under root/files (kept between runs); returns their captions."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    marker = root / "rendered.txt"
    rendered = int(marker.read_text()) if marker.exists() else 0
    if rendered < count:
        started = time.monotonic()
        with multiprocessing.Pool(2) as pool:
            for index, data in pool.imap_unordered(_render, range(rendered, count), chunksize=256):
                (files / f"img_{index:06d}.jpg").write_bytes(data)
        marker.write_text(str(count))
        print(f"corpus: {count - rendered} pictures rendered in {time.monotonic() - started:.0f} s", flush=True)
    return [caption_of(index) for index in range(count)]


def write_rows(path: Path, base_url: str, captions: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for index, caption in enumerate(captions):
            writer.writerow([f"{base_url}/files/img_{index:06d}.jpg", caption])


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------


def curate(command: str, rows: Path, out: Path, port: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))
    measured = run_measured(
        [sys.executable, "-m", "pipeline.cli", command, "--input", str(rows), "--output", str(out),
         "--allow-host", f"127.0.0.1:{port}", "--set", "retries=0", "--quiet"] + extra,
        env=env, cwd=REPO, timeout=7200,
    )
    phases, cpu = {}, {}
    for phase in ("fetch", "decide", "write"):
        info_path = out / "run" / f"{phase}.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            phases[phase] = info["seconds"]
            cpu[phase] = info.get("cpu_seconds")
    measured["phases"], measured["phase_cpu_seconds"] = phases, cpu
    summary_path = out / "report" / "summary.json"
    measured["summary"] = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return measured


def kept_of(summary) -> int:
    return int(summary["kept"]) if summary and "kept" in summary else -1


def stage_caption(captions: list[str]) -> float:
    """Caption cleaning, rules and language ID alone (the per-sample function of CaptionStage)."""
    from pipeline.config import CurateConfig
    from schemas import Col
    from transforms import caption

    config = CurateConfig()
    caption.load_models(config.langid_backend)
    records = [{Col.UID: str(i), Col.CAPTION: text} for i, text in enumerate(captions)]
    started = time.perf_counter()
    for record in records:
        caption.annotate_caption(record, config)
    return len(records) / (time.perf_counter() - started)


def stage_descriptor(root: Path, count: int) -> float:
    """The near-dedup descriptor alone (image_hashes on the decoded, resized image)."""
    from pipeline.config import CurateConfig
    from transforms.decode import decode_image
    from transforms.dedup import image_hashes

    config = CurateConfig()
    decoded = [decode_image((root / "files" / f"img_{i:06d}.jpg").read_bytes(), config).rgb for i in range(count)]
    started = time.perf_counter()
    for image in decoded:
        image_hashes(image, config.blank_std_threshold)
    return count / (time.perf_counter() - started)


def _with_image(record: dict, root: str) -> dict:
    from schemas import Col

    record = dict(record)
    record[Col.IMAGE_BYTES] = Path(root, "files", record.pop("path")).read_bytes()
    return record


def stage_clip(root: Path, captions: list[str], count: int, clip_args: list[str]) -> tuple[float, float]:
    """The pipeline's ClipScoring alone (model load included) on `count` pairs, FnApiRunner:
    (pairs/s, CPU seconds of this process meanwhile, every thread).

    Images are read from disk inside the pipeline (as the fetch phase reads them back from raw/),
    not embedded in the pipeline graph."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline.config import build_config
    from schemas import Col, Status
    from transforms.clip_score import ClipScoring

    overrides = [value for flag, value in zip(clip_args[::2], clip_args[1::2])]
    config = build_config(None, overrides)
    records = [{Col.UID: f"{i:08d}", Col.STATUS: Status.KEPT, Col.CAPTION_CLEAN: captions[i],
                "path": f"img_{i:06d}.jpg"} for i in range(count)]
    out = tempfile.mktemp(prefix="e2e_clip_")
    started, cpu_started = time.perf_counter(), time.process_time()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        scored = p | beam.Create(records) | beam.Map(_with_image, str(root)) | ClipScoring(config)
        _ = scored.kept | beam.combiners.Count.Globally() | beam.Map(lambda n: Path(out).write_text(str(n)))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert int(Path(out).read_text()) == count, "CLIP alone lost samples"
    return count / seconds, cpu_seconds


def make_random_vit() -> None:
    if not os.path.exists(VIT_CHECKPOINT):
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        torch.save(model.state_dict(), VIT_CHECKPOINT)


def measure_rss(results: dict, rss_rows: list[int], captions, server, work: Path, clip_args) -> None:
    for count in rss_rows:
        if count in results["rss"]:
            continue
        rss_csv = work / f"rows_{count}.csv"
        write_rows(rss_csv, server.base_url, captions[:count])
        print(f"memory: curate run on {count} rows ...", flush=True)
        measured = curate("run", rss_csv, work / f"out_rss_{count}", server.port, clip_args)
        results["rss"][count] = round(measured["peak_rss_mb"])
        results.setdefault("rss_runs", {})[count] = {"seconds": round(measured["seconds"], 1),
                                                      "kept": kept_of(measured["summary"]),
                                                      "phases": measured["phases"]}
    if len(rss_rows) >= 2:
        results["rss_growth"] = round(results["rss"][max(rss_rows)] / results["rss"][min(rss_rows)], 3)


def print_rss(results: dict, rss_rows: list[int]) -> None:
    for count, mb in results["rss"].items():
        print(f"peak RSS at {count} rows: {mb} MB")
    if "rss_growth" in results:
        print(f"RSS growth {max(rss_rows)} / {min(rss_rows)} rows: {results['rss_growth']:.2f}x (target <= 1.3)")


def memory_only(results: dict, rss_rows: list[int], captions, server, work: Path, clip_args) -> int:
    results["rss"] = {}
    try:
        measure_rss(results, rss_rows, captions, server, work, clip_args)
    finally:
        server.close()
    print_rss(results, rss_rows)
    print(json.dumps(results))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rss-rows", default="10000,50000", help="row counts for the memory runs ('' skips them)")
    parser.add_argument("--latency-ms", type=float, default=80.0)
    parser.add_argument("--clip", choices=("tiny", "vit-b-32"), default="vit-b-32", help="model of the throughput part")
    parser.add_argument("--rss-clip", choices=("tiny", "vit-b-32"), default="tiny", help="model of the memory runs")
    parser.add_argument("--clip-alone-pairs", type=int, default=0,
                        help="pairs for the CLIP-alone rate (0: as many as --rows; fewer understate the rate: "
                             "the model load weighs more)")
    parser.add_argument("--clip-threads", type=int, default=0,
                        help="CLIP's inference threads alone and in the pipeline (0: one per core; "
                             "fewer leave the other stages cores of their own, as beside an accelerator)")
    parser.add_argument("--memory-only", action="store_true", help="only the RSS runs (no throughput part)")
    parser.add_argument("--work", default="/tmp/bench_end_to_end_photos", help="scratch folder (the corpus is kept)")
    args = parser.parse_args()

    rss_rows = [int(n) for n in args.rss_rows.split(",") if n.strip()]
    work = Path(args.work)
    root = work / "server"
    largest = max([args.rows] + rss_rows)
    captions = make_corpus(root, largest)
    if "vit-b-32" in (args.clip, args.rss_clip):
        make_random_vit()
    clip_args, rss_clip_args = ((TINY_CLIP if model == "tiny" else VIT_CLIP) + NO_CLIP_FILTER
                                for model in (args.clip, args.rss_clip))
    if args.clip_threads:
        clip_args = clip_args + ["--set", f"clip_cpu_threads={args.clip_threads}"]
    server = BenchServer(root, args.latency_ms)
    results: dict = {"rows": args.rows, "latency_ms": args.latency_ms, "clip": args.clip, "rss_clip": args.rss_clip,
                     "clip_threads": args.clip_threads or CORES, "cores": CORES}
    try:
        rows = work / f"rows_{args.rows}.csv"
        write_rows(rows, server.base_url, captions[: args.rows])

        if args.memory_only:
            return memory_only(results, rss_rows, captions, server, work, rss_clip_args)
        print(f"full pipeline: curate run on {args.rows} rows ...", flush=True)
        full = curate("run", rows, work / "out_full", server.port, clip_args)
        total = full["seconds"]
        results["full"] = {"seconds": round(total, 1), "rows_per_s": round(args.rows / total, 1),
                           "phases": full["phases"], "phase_cpu_seconds": full["phase_cpu_seconds"],
                           "kept": kept_of(full["summary"]),
                           "peak_rss_mb": round(full["peak_rss_mb"])}

        print("stages alone ...", flush=True)
        alone = {}
        download = curate("fetch", rows, work / "out_download", server.port, STAGES_OFF)
        alone["download+decode+resize"] = args.rows / download["seconds"]
        alone["caption+langid"] = stage_caption(captions[: args.rows])
        alone["dedup descriptor"] = stage_descriptor(root, min(args.rows, 2000))
        clip_pairs = min(args.rows, args.clip_alone_pairs or args.rows)
        alone["clip"], clip_cpu = stage_clip(root, captions, clip_pairs, clip_args)
        results["clip_alone"] = {"pairs": clip_pairs, "cpu_seconds": round(clip_cpu, 1),
                                 "cores_busy": round(clip_cpu * alone["clip"] / clip_pairs, 2)}
        for phase in ("decide", "write"):
            if full["phases"].get(phase):
                alone[f"{phase} phase"] = args.rows / full["phases"][phase]
        results["alone_rows_per_s"] = {k: round(v, 1) for k, v in alone.items()}
        bottleneck = min(alone, key=alone.get)
        results["bottleneck"] = bottleneck
        results["fraction_of_bottleneck"] = round((args.rows / total) / alone[bottleneck], 3)
        # Where every stage runs on the same cores, the pipeline takes at least its CPU seconds /
        # cores, however well it overlaps them: that bounds the fraction it can reach here, when
        # the bottleneck is CPU work (CLIP; not the download, which waits on the network)
        pipeline_cpu = sum(seconds or 0.0 for seconds in full["phase_cpu_seconds"].values())
        if pipeline_cpu and bottleneck == "clip" and results["clip_threads"] >= CORES:
            results["pipeline_cpu_seconds"] = round(pipeline_cpu, 1)
            results["cpu_ceiling"] = round((args.rows / alone[bottleneck]) * CORES / pipeline_cpu, 3)

        same_model = args.clip == args.rss_clip
        results["rss"] = {args.rows: results["full"]["peak_rss_mb"]} if same_model and args.rows in rss_rows else {}
        measure_rss(results, rss_rows, captions, server, work, rss_clip_args)
    finally:
        server.close()

    print(f"\n{'stage alone':<26} {'rows/s':>9}")
    for stage, rate in results["alone_rows_per_s"].items():
        print(f"{stage:<26} {rate:>9.1f}{'   <- bottleneck' if stage == results['bottleneck'] else ''}")
    phases = results["full"]["phases"]
    print(f"\nfull `curate run` ({args.rows} rows, {results['full']['kept']} kept): {results['full']['seconds']} s, "
          f"{results['full']['rows_per_s']} rows/s; phases: "
          + ", ".join(f"{p} {s:.1f} s ({args.rows / s:.0f} rows/s)" for p, s in phases.items()))
    cpu = results["full"]["phase_cpu_seconds"]
    if all(cpu.values()):
        print("CPU seconds per phase: " + ", ".join(f"{p} {c:.0f}" for p, c in cpu.items())
              + f"; CLIP alone {results['clip_alone']['cpu_seconds']:.0f} on {results['clip_alone']['pairs']} pairs"
              f" ({results['clip_alone']['cores_busy']:.2f} cores busy of {CORES})")
    print(f"pipeline throughput / bottleneck alone: {results['fraction_of_bottleneck']:.2f} (target >= 0.85); "
          f"CLIP on {results['clip_threads']} inference thread(s) of {CORES} cores, alone and in the pipeline")
    if "cpu_ceiling" in results:
        print(f"  ceiling on these {CORES} cores: {results['cpu_ceiling']:.2f} (the bottleneck's time alone / "
              "the pipeline's CPU seconds per core: the fraction if every core were busy all along)")
    print_rss(results, rss_rows)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
