"""curate fetch vs img2dataset: same URL list, same local server with latency, one run.

    python benchmarks/download_vs_img2dataset.py [--rows 4000] [--latency-ms 80] [--repeat 1]
        [--images 120] [--image-kind real|synthetic] [--configs default,stripped]
        [--modes multi,in_process] [--profile] [--baseline DIR] [--hosts 1000] [--no-img2dataset]

Both download, resize to 256 (border) and write WebDataset shards. img2dataset runs with
2 processes x 64 threads. curate runs `curate fetch` in each configuration (CONFIGS):
  default   what a user gets: no flags but `--set clip_enabled=false` (language ID auto, the
            near-dedup descriptor, per-host cap 16, site policies on)
  stripped  what img2dataset does and no more (STAGES_OFF: language ID and the near-dedup
            descriptor off, per-host cap 128)
and each in two local runner modes (MODES):
  multi       multi_processing with a worker per core: what no runner flags give from
              FETCH_MULTI_PROCESS_MIN_ROWS (2,000) rows on a machine with more than one core
  in_process  `--direct_running_mode in_memory`: what no runner flags give below it
  auto        no runner flags (not in the default --modes)
(the mode run/fetch.json recorded is printed with each case)
Every round runs img2dataset and each curate case once, in an order that rotates from round to
round; each curate case's ratio is over img2dataset's rate of the same round, and the median over
rounds is reported (this machine is shared: single rounds vary by +-20%).

Images (--image-kind real, the default): clip art from /usr/share/openclipart flattened onto white
and photos from /usr/share/wallpapers and /usr/share/backgrounds, saved as JPEG (quality 90) at
several long sides (clip art 256-1024, photos 640-2048); `synthetic` is the old photo_like set.

`--profile` then runs the fetch phase in this process's child on the in-process runner, once per
configuration, with CPU-time accounting (time.thread_time around each part, the fetch loop's
thread read from /proc) and prints CPU milliseconds per row: caption cleaning + language ID,
HTTP (the aiohttp loop thread), sha256, decode (+ blank check + JPEG encode), resize, descriptor
(near-dedup descriptor and pHash; pHash alone when the descriptor is off), and Beam + the rest
(the process's CPU time minus the parts: runner, reading, raw tar and Parquet writing).

`--baseline DIR` runs, instead of img2dataset, `curate fetch` of another checkout of curate (e.g.
a git worktree of main) beside this one's in every round, for each configuration and mode of
--configs and --modes, alternating which of the two goes first, and prints each round's ratio of
this checkout over it with their median and spread: a before/after measurement.

`--hosts N` spreads the rows over N host names (h00000.bench.test, ...) mapped to the server on
127.0.0.1 (config `resolve_hosts` + `allow_hosts`), and runs this checkout with the site-policy
checks on and off in alternating rounds: the cost of fetching and applying N robots.txt and
tdmrep.json files (img2dataset cannot resolve these names, so it is left out of this case).
"""

from __future__ import annotations

import argparse
import csv
import functools
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


CONFIGS = {"default": ["--set", "clip_enabled=false"], "stripped": STAGES_OFF}
MODES = {"multi": ["--direct_running_mode=multi_processing", f"--direct_num_workers={len(os.sched_getaffinity(0))}"],
         "in_process": ["--direct_running_mode=in_memory"], "auto": []}

CLIP_ART_SIDES = [256, 400, 640, 1024]
PHOTO_SIDES = [640, 1024, 1600, 2048]


def _real_sources() -> tuple[list[Path], list[Path]]:
    clip_art = sorted(Path("/usr/share/openclipart").rglob("*.png"))
    photos = sorted(p for root in ("/usr/share/wallpapers", "/usr/share/backgrounds")
                    for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                    and "screenshot" not in p.name)
    return clip_art, photos


def _as_jpeg(source: Path, long_side: int) -> "Image.Image":
    from PIL import Image

    image = Image.open(source)
    image.draft("RGB", (long_side, long_side))
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        image = canvas
    image = image.convert("RGB")
    scale = long_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def make_images(files: Path, count: int, kind: str = "real") -> dict:
    """`count` JPEGs img_NNN.jpg: real clip art and photos at several sizes (3 of every 5 clip
    art), or the synthetic photo-like set. Returns what was made (kinds, sizes, bytes)."""
    files.mkdir(parents=True, exist_ok=True)
    made = {"clip_art": 0, "photo": 0, "synthetic": 0, "bytes": 0, "sides": set()}
    clip_art, photos = _real_sources() if kind == "real" else ([], [])
    if kind == "real" and (not clip_art or not photos):
        raise SystemExit("--image-kind real needs /usr/share/openclipart and /usr/share/wallpapers|backgrounds")
    sizes = [(1024, 768), (800, 600), (1280, 960), (640, 480), (1200, 800)]
    for index in range(count):
        path = files / f"img_{index:03d}.jpg"
        if kind != "real":
            width, height = sizes[index % len(sizes)]
            photo_like(width, height, index).save(path, quality=90)
            made["synthetic"] += 1
        elif index % 5 < 3:
            side = CLIP_ART_SIDES[index % len(CLIP_ART_SIDES)]
            _as_jpeg(clip_art[(index * 7919) % len(clip_art)], side).save(path, quality=90)
            made["clip_art"] += 1
            made["sides"].add(side)
        else:
            side = PHOTO_SIDES[index % len(PHOTO_SIDES)]
            _as_jpeg(photos[(index * 31) % len(photos)], side).save(path, quality=90)
            made["photo"] += 1
            made["sides"].add(side)
        made["bytes"] += path.stat().st_size
    made["sides"] = sorted(made["sides"])
    return made


POLICIES_OFF = ["--set", "respect_robots_txt=false", "--set", "respect_tdmrep=false",
                "--set", "respect_content_usage=false"]


def host_names(count: int) -> list[str]:
    return [f"h{index:05d}.bench.test" for index in range(count)]


def write_rows(path: Path, base_url: str, rows: int, images: int, hosts: int = 0, port: int = 0) -> None:
    from pipeline.synthetic import all_attributes

    captions = [attrs.caption() for attrs in all_attributes()]  # alt-text style English captions
    names = host_names(hosts)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for index in range(rows):  # distinct urls, served from a pool of images
            base = f"http://{names[index % hosts]}:{port}" if hosts else base_url
            writer.writerow([f"{base}/files/img_{index % images:03d}.jpg?n={index}", captions[index % len(captions)]])


def write_hosts_config(path: Path, hosts: int, port: int) -> None:
    import yaml

    names = host_names(hosts)
    path.write_text(yaml.safe_dump({"resolve_hosts": {name: "127.0.0.1" for name in names},
                                    "allow_hosts": [f"{name}:{port}" for name in names]}))


COMMON = ["--set", "image_size=256", "--set", "resize_mode=border", "--set", "retries=0"]


def run_curate(repo: Path, rows: Path, out: Path, port: int, env: dict, extra: list[str],
               stages: list[str] = STAGES_OFF) -> dict:
    """`curate fetch` of checkout `repo`; --allow-host unless a config file in `extra` lists them
    (the flag would replace its list)."""
    shutil.rmtree(out, ignore_errors=True)
    allow = [] if "--config" in extra else ["--allow-host", f"127.0.0.1:{port}"]
    result = run_measured(
        [sys.executable, "-m", "pipeline.cli", "fetch", "--input", str(rows), "--output", str(out)] + allow
        + COMMON + ["--quiet"] + stages + extra,
        env=dict(env, PYTHONPATH=str(repo)), cwd=repo,
    )
    result["ok"] = count_tar_samples(f"{out}/raw/*.tar")
    result["rate"] = result["ok"] / result["seconds"]
    info = json.loads((out / "run" / "fetch.json").read_text()) if (out / "run" / "fetch.json").exists() else {}
    result["policy_counters"] = {k: v for k, v in sorted((info.get("metrics") or {}).items()) if k.startswith("policy/")}
    runner = info.get("runner") or {}
    result["mode"] = f"{runner.get('direct_running_mode')}x{runner.get('direct_num_workers') or 1}" if runner else "?"
    return result


def in_alternating_order(round_index: int, run_a, run_b) -> tuple[dict, dict]:
    """(run_a(), run_b()), run in the order a, b on even rounds and b, a on odd ones: a machine
    that drifts, or a warm page cache, favours neither."""
    if round_index % 2:
        b = run_b()
        return run_a(), b
    a = run_a()
    return a, run_b()


def paired(label_a: str, label_b: str, rounds: list[tuple[dict, dict]]) -> dict:
    """Per-round ratio b/a of samples/s, with the median and the spread over rounds."""
    import statistics

    ratios = [b["rate"] / a["rate"] for a, b in rounds]
    cpu_ratios = [b["cpu_seconds"] / a["cpu_seconds"] for a, b in rounds]
    summary = {
        f"{label_a}_cpu_seconds": [round(a["cpu_seconds"], 1) for a, _ in rounds],
        f"{label_b}_cpu_seconds": [round(b["cpu_seconds"], 1) for _, b in rounds],
        "round_cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "median_cpu_ratio": round(statistics.median(cpu_ratios), 3),
        "cpu_ratio_spread": [round(min(cpu_ratios), 3), round(max(cpu_ratios), 3)],
        f"{label_a}_samples_per_s": [round(a["rate"], 1) for a, _ in rounds],
        f"{label_b}_samples_per_s": [round(b["rate"], 1) for _, b in rounds],
        f"{label_a}_median": round(statistics.median(a["rate"] for a, _ in rounds), 1),
        f"{label_b}_median": round(statistics.median(b["rate"] for _, b in rounds), 1),
        "round_ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        f"{label_a}_ok": [a["ok"] for a, _ in rounds], f"{label_b}_ok": [b["ok"] for _, b in rounds],
    }
    print(f"{label_b} / {label_a}: median {summary['median_ratio']:.3f} over {len(ratios)} rounds "
          f"(min {summary['ratio_spread'][0]:.3f}, max {summary['ratio_spread'][1]:.3f}); medians "
          f"{summary[f'{label_a}_median']} vs {summary[f'{label_b}_median']} samples/s; CPU seconds "
          f"{label_b} / {label_a}: median {summary['median_cpu_ratio']:.3f} (min {summary['cpu_ratio_spread'][0]:.3f}, "
          f"max {summary['cpu_ratio_spread'][1]:.3f})", flush=True)
    return summary


def count_tar_samples(pattern: str) -> int:
    import tarfile

    total = 0
    for path in glob.glob(pattern):
        with tarfile.open(path) as archive:
            total += sum(1 for m in archive.getmembers() if m.name.endswith(".jpg"))
    return total


def run_img2dataset(rows: Path, out: Path, env: dict, cwd: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    result = run_measured(
        [str(bin_dir / "img2dataset"), "--url_list", str(rows), "--input_format", "csv", "--url_col", "url",
         "--caption_col", "caption", "--output_folder", str(out), "--processes_count", "2",
         "--thread_count", "64", "--image_size", "256", "--resize_mode", "border", "--output_format",
         "webdataset", "--number_sample_per_shard", "1000", "--timeout", "20", "--retries", "0"],
        env=env, cwd=cwd,
    )
    result["ok"] = count_tar_samples(f"{out}/*.tar")
    result["rate"] = result["ok"] / result["seconds"]
    return result


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000)
    parser.add_argument("--latency-ms", type=float, default=80.0)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--image-kind", choices=("real", "synthetic"), default="real")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median ratio per case is reported")
    parser.add_argument("--configs", default="default,stripped", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--modes", default="multi,in_process", help=f"of {', '.join(MODES)}")
    parser.add_argument("--profile", action="store_true", help="per-row CPU ms per part, each config (in process)")
    parser.add_argument("--profile-rows", type=int, default=2_000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--curate-args", default="", help="extra args for curate fetch, e.g. Beam options")
    parser.add_argument("--baseline", default=None, help="another curate checkout: before/after rounds")
    parser.add_argument("--hosts", type=int, default=0, help="spread rows over N host names: policies on vs off")
    parser.add_argument("--no-img2dataset", action="store_true", help="leave img2dataset out of the rounds")
    parser.add_argument("--profile-child", nargs=4, metavar=("ROWS", "OUT", "PORT", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_child:
        return profile_child(*args.profile_child)
    if args.hosts:
        return hosts_case(args)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_download_"))
    root = work / "server"
    made = make_images(root / "files", args.images, args.image_kind)
    server = BenchServer(root, args.latency_ms)
    baseline = Path(args.baseline).resolve() if args.baseline else None
    cases = [(config, mode) for config in args.configs.split(",") for mode in args.modes.split(",")]
    results = {"rows": args.rows, "latency_ms": args.latency_ms, "rounds": args.repeat, "cores": os.cpu_count(),
               "images": {k: v for k, v in made.items()}, "load_average_before": load_average()}
    print(f"{args.rows} rows over {args.images} images {made}; load average {results['load_average_before']}",
          flush=True)
    try:
        rows = work / "rows.csv"
        write_rows(rows, server.base_url, args.rows, args.images)
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))
        extra = args.curate_args.split()

        if baseline is not None:
            before_after = {case: [] for case in cases}
            for round_index in range(args.repeat):
                for config, mode in cases:
                    run = functools.partial(run_curate, rows=rows, port=server.port, env=env,
                                            extra=MODES[mode] + extra, stages=CONFIGS[config])
                    ours = lambda: run(REPO, out=work / "curate_out")  # noqa: E731
                    before = lambda: run(baseline, out=work / "baseline_out")  # noqa: E731
                    base, curate = in_alternating_order(round_index, before, ours)
                    before_after[(config, mode)].append((base, curate))
                    print(f"round {round_index + 1}: {config}/{mode}: baseline {base['rate']:.1f} samples/s "
                          f"({base['mode']}), this checkout {curate['rate']:.1f} samples/s ({curate['mode']}), ratio "
                          f"{curate['rate'] / base['rate']:.3f}; CPU s {base['cpu_seconds']:.1f} vs "
                          f"{curate['cpu_seconds']:.1f}", flush=True)
            results["this_checkout_over_baseline"] = {}
            for (config, mode), pairs in before_after.items():
                print(f"{config}/{mode}: ", end="")
                results["this_checkout_over_baseline"][f"{config}/{mode}"] = paired("baseline", "this_checkout", pairs)
            print(json.dumps(results))
            return 0

        rounds = []
        for round_index in range(args.repeat):
            jobs = ([("img2dataset", None)] if not args.no_img2dataset else []) + cases
            shift = round_index % len(jobs)  # rotate the order: a drifting machine favours none
            jobs = jobs[shift:] + jobs[:shift]
            measured = {}
            for config, mode in jobs:
                if config == "img2dataset":
                    measured["img2dataset"] = run_img2dataset(rows, work / "img2dataset_out", env, work)
                else:
                    measured[(config, mode)] = run_curate(REPO, rows, work / "curate_out", server.port, env,
                                                          MODES[mode] + extra, stages=CONFIGS[config])
                r = measured[(config, mode) if mode else "img2dataset"]
                print(f"round {round_index + 1}: {config:<11} {mode or '':<10} {r.get('mode', ''):<20} "
                      f"ok {r['ok']:>6} {r['seconds']:7.1f} s {r['rate']:7.1f} samples/s  CPU {r['cpu_seconds']:6.1f} s "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
            rounds.append(measured)
    finally:
        server.close()

    import statistics

    results["load_average_after"] = load_average()
    table = {}
    for case in cases:
        runs = [m[case] for m in rounds]
        entry = {"mode": runs[-1]["mode"], "ok": runs[-1]["ok"],
                 "samples_per_s": round(statistics.median(r["rate"] for r in runs), 1),
                 "cpu_ms_per_row": round(statistics.median(1000 * r["cpu_seconds"] / max(r["ok"], 1) for r in runs), 2),
                 "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs))}
        if not args.no_img2dataset:
            ratios = [m[case]["rate"] / m["img2dataset"]["rate"] for m in rounds]
            entry["ratio_over_img2dataset"] = round(statistics.median(ratios), 2)
            entry["round_ratios"] = [round(r, 2) for r in ratios]
        table[f"{case[0]}/{case[1]}"] = entry
    if not args.no_img2dataset:
        i2d = [m["img2dataset"] for m in rounds]
        results["img2dataset"] = {"ok": i2d[-1]["ok"], "samples_per_s": round(statistics.median(r["rate"] for r in i2d), 1),
                                  "cpu_ms_per_row": round(statistics.median(1000 * r["cpu_seconds"] / max(r["ok"], 1) for r in i2d), 2),
                                  "peak_rss_mb": round(max(r["peak_rss_mb"] for r in i2d))}
    results["curate"] = table
    print(f"\n{'case':<22} {'runner':<20} {'ok':>6} {'samples/s':>10} {'x img2dataset':>14} {'CPU ms/row':>11} {'peak RSS MB':>12}")
    if "img2dataset" in results:
        r = results["img2dataset"]
        print(f"{'img2dataset':<22} {'2 procs x 64 threads':<20} {r['ok']:>6} {r['samples_per_s']:>10.1f} {'1.00':>14} "
              f"{r['cpu_ms_per_row']:>11.2f} {r['peak_rss_mb']:>12}")
    for name, r in table.items():
        ratio = f"{r['ratio_over_img2dataset']:.2f}" if "ratio_over_img2dataset" in r else "-"
        print(f"{'curate ' + name:<22} {r['mode']:<20} {r['ok']:>6} {r['samples_per_s']:>10.1f} {ratio:>14} "
              f"{r['cpu_ms_per_row']:>11.2f} {r['peak_rss_mb']:>12}")
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']} "
          f"({os.cpu_count()} cores)")

    if args.profile:
        results["profile_ms_per_row"] = {}
        server = BenchServer(root, args.latency_ms)
        try:
            rows = work / "profile_rows.csv"
            write_rows(rows, server.base_url, args.profile_rows, args.images)
            for config in args.configs.split(","):
                out = work / f"profile_{config}"
                shutil.rmtree(out, ignore_errors=True)
                done = run_measured([sys.executable, str(Path(__file__).resolve()), "--profile-child", str(rows), str(out),
                                     str(server.port), config], env=env, cwd=REPO)
                parts = json.loads(done["output"].strip().splitlines()[-1])
                results["profile_ms_per_row"][config] = parts
        finally:
            server.close()
        names = list(next(iter(results["profile_ms_per_row"].values())))
        print(f"\nCPU ms per row, in process ({args.profile_rows} rows): " + ", ".join(names))
        print(f"{'config':<10}" + "".join(f"{n:>12}" for n in names))
        for config, parts in results["profile_ms_per_row"].items():
            print(f"{config:<10}" + "".join(f"{parts[n]:>12.2f}" for n in names))
    print(json.dumps(results, default=str))
    return 0


def profile_child(rows: str, out: str, port: str, config_name: str) -> int:
    """One fetch phase in this process (in_memory), each part's CPU time accumulated per thread
    (time.thread_time) around the functions that do it; prints a JSON line of ms per row."""
    import resource
    import threading
    import time

    import imagehash

    import pipeline.fetch as fetch
    import transforms.caption as caption
    import transforms.decode as decode
    from pipeline import cli
    from transforms.download import _FetchDoFn

    # Beam pickles the DoFns (and the wrappers in them) by value: the accumulator is found at call
    # time through a module, so every copy adds to the same one; a part inside itself (pHash
    # inside the descriptor) counts once
    fetch._profile = {"spent": {"caption+langid": 0.0, "sha256": 0.0, "decode": 0.0, "resize": 0.0,
                                "descriptor": 0.0},
                      "lock": threading.Lock(), "inside": threading.local()}
    spent = fetch._profile["spent"]

    def timed(part, fn):
        def wrapper(*a, **k):
            import sys as _sys
            import time as _time

            profile = _sys.modules["pipeline.fetch"]._profile
            inside = profile["inside"]
            if getattr(inside, part, False):
                return fn(*a, **k)
            setattr(inside, part, True)
            start = _time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                setattr(inside, part, False)
                with profile["lock"]:
                    profile["spent"][part] += _time.thread_time() - start
        return wrapper

    # decode_image's time includes _resize's: subtracted below
    caption.annotate_caption = timed("caption+langid", caption.annotate_caption)
    fetch.sha256_hex = timed("sha256", fetch.sha256_hex)
    fetch.decode_image = timed("decode", fetch.decode_image)
    decode._resize = timed("resize", decode._resize)
    fetch.image_hashes = timed("descriptor", fetch.image_hashes)
    imagehash.phash = timed("descriptor", imagehash.phash)
    loop_threads = []
    loop_cpu = {}
    setup, teardown = _FetchDoFn.setup, _FetchDoFn.teardown

    def thread_cpu(native_id):
        try:
            with open(f"/proc/self/task/{native_id}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None

    def setup_and_note(self):
        setup(self)
        loop_threads.append(self._thread.native_id)

    def note_and_teardown(self):
        value = thread_cpu(self._thread.native_id)
        if value is not None:
            loop_cpu[self._thread.native_id] = value
        teardown(self)

    _FetchDoFn.setup, _FetchDoFn.teardown = setup_and_note, note_and_teardown
    caption.load_models()  # model loading is not per-row work
    args, beam_args = cli.parse_args(
        ["fetch", "--input", rows, "--output", out, "--allow-host", f"127.0.0.1:{port}"] + COMMON + ["--quiet"]
        + CONFIGS[config_name] + ["--direct_running_mode=in_memory"])
    layout, config = cli._layout_and_config(args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = usage.ru_utime + usage.ru_stime
    cli.run_phase("fetch", config, layout, beam_args, quiet=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime - before
    for native_id in loop_threads:
        if native_id not in loop_cpu:
            value = thread_cpu(native_id)
            loop_cpu[native_id] = value or 0.0
    spent["decode"] -= spent["resize"]
    spent["http"] = sum(loop_cpu.values())
    row_count = sum(1 for _ in open(rows)) - 1
    spent["beam+rest"] = total - sum(spent.values())
    spent["total"] = total
    print(json.dumps({name: round(1000 * value / row_count, 3) for name, value in spent.items()}))
    return 0


def hosts_case(args) -> int:
    """Rows over `args.hosts` loopback host names: site policies on vs off, alternating rounds."""
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_download_hosts_"))
    root = work / "server"
    make_images(root / "files", args.images)
    server = BenchServer(root, args.latency_ms)
    try:
        rows = work / "rows.csv"
        write_rows(rows, server.base_url, args.rows, args.images, hosts=args.hosts, port=server.port)
        hosts_yaml = work / "hosts.yaml"
        write_hosts_config(hosts_yaml, args.hosts, server.port)
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
        extra = ["--config", str(hosts_yaml)] + args.curate_args.split()
        rounds = []
        for round_index in range(args.repeat):
            on = lambda: run_curate(REPO, rows, work / "on_out", server.port, env, extra)  # noqa: E731
            off = lambda: run_curate(REPO, rows, work / "off_out", server.port, env, extra + POLICIES_OFF)  # noqa: E731
            without, with_policies = in_alternating_order(round_index, off, on)
            rounds.append((without, with_policies))
            print(f"round {round_index + 1}: policies off {without['rate']:.1f} samples/s, on "
                  f"{with_policies['rate']:.1f} samples/s, ratio {with_policies['rate'] / without['rate']:.3f}; CPU s "
                  f"{without['cpu_seconds']:.1f} vs {with_policies['cpu_seconds']:.1f}; "
                  f"{with_policies['policy_counters']}", flush=True)
    finally:
        server.close()
    results = {"rows": args.rows, "hosts": args.hosts, "latency_ms": args.latency_ms, "rounds": len(rounds),
               "policies_on_over_off": paired("policies_off", "policies_on", rounds),
               "policy_counters": rounds[-1][1]["policy_counters"]}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
