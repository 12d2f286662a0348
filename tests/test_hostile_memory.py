"""Hostile servers cost bounded memory and bounded time: a whole `curate run` in a child process
against hundreds of oversized, endless and dripping bodies, with its peak RSS read from the kernel."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq

from pipeline.errors import EXIT_CEILING
from schemas import Col, DropReason
from tests.conftest import REPO

MAX_BODY_BYTES = 4_000_000
MAX_IN_FLIGHT = 64
# What the run may hold beyond a run of a few harmless rows: at most MAX_IN_FLIGHT bodies of
# MAX_BODY_BYTES (256 MB), plus slack for buffers and allocator arenas. Buffering the bodies the
# server offers instead (80 x 128 MiB chunked, 80 x a claimed 2 GB) would be tens of GB.
EXTRA_LIMIT_MB = MAX_IN_FLIGHT * MAX_BODY_BYTES / 2**20 + 300


def _high_water_mb(pid: int) -> float:
    """The kernel's peak RSS of the process (VmHWM). Not ru_maxrss: that one keeps the forking
    parent's size across exec, and the parent here is pytest with torch loaded."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_with_peak_rss(command: list[str], timeout_s: float) -> tuple[int, float, float]:
    """(exit code, peak RSS in MB of the child, seconds); the child is killed at the timeout."""
    started = time.monotonic()
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _high_water_mb(process.pid))  # monotonic: sampling often enough is exact
        if time.monotonic() - started > timeout_s:
            process.kill()
            process.wait()
            raise AssertionError(f"the run did not finish within {timeout_s} s")
        time.sleep(0.05)
    return process.returncode, peak, time.monotonic() - started


def _run(server, rows, out) -> tuple[int, float, float]:
    return run_with_peak_rss(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", str(rows), "--output", str(out),
         "--allow-host", server.allow, "--quiet",
         "--set", f"max_body_bytes={MAX_BODY_BYTES}", "--set", f"max_in_flight={MAX_IN_FLIGHT}",
         "--set", f"per_host_concurrency={MAX_IN_FLIGHT}", "--set", "request_deadline_s=3",
         "--set", "retries=0", "--set", "clip_enabled=false", "--set", "langid_backend=none"],
        timeout_s=240,
    )


def test_hostile_bodies_cost_bounded_memory_and_time(server, tmp_path):
    harmless = tmp_path / "harmless.csv"
    harmless.write_text("url,caption\n" + "".join(f"{server.base_url}/status/404?n={i},a missing picture {i}\n"
                                                   for i in range(4)))
    code, baseline_mb, _ = _run(server, harmless, tmp_path / "baseline")
    assert code == EXIT_CEILING  # every row fails on purpose here: the run says so (outputs written)

    kinds = [("huge-chunked", 80, DropReason.BODY_TOO_LARGE), ("huge", 80, DropReason.BODY_TOO_LARGE),
             ("drip", 40, DropReason.TIMEOUT), ("stall", 40, DropReason.TIMEOUT)]
    rows = tmp_path / "rows.csv"
    expected = {}
    with open(rows, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for path, count, reason in kinds:
            for index in range(count):
                url = f"{server.base_url}/{path}?n={index}"
                writer.writerow([url, f"a hostile {path} body number {index}"])
                expected[url] = reason.value
    out = tmp_path / "out"
    code, peak_mb, seconds = _run(server, rows, out)
    assert code == EXIT_CEILING
    ledger = pq.read_table(sorted(glob.glob(f"{out}/ledger/*.parquet"))).to_pylist()
    assert {row[Col.URL]: row[Col.REASON] for row in ledger} == expected
    print(f"hostile run: peak RSS {peak_mb:.0f} MB (harmless run {baseline_mb:.0f} MB), {seconds:.1f} s")
    assert peak_mb - baseline_mb < EXTRA_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB vs {baseline_mb:.0f} MB"


RELEASE_PROBE = """
import sys
sys.path.insert(0, {repo!r})
from pipeline.heap import keep_freed_memory, release_freed_memory

def rss_mb():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))

keep_freed_memory()  # what loading CLIP does to the whole process
blocks = [bytearray(b"x" * 4_000_000) for _ in range(100)]  # 400 MB in heap blocks, all touched
del blocks
kept = rss_mb()
release_freed_memory()  # what `curate run` does between phases
print(kept, rss_mb())
"""


def test_phases_hand_back_the_memory_clip_told_the_heap_to_keep():
    """CLIP's heap policy keeps freed blocks for speed; between phases they go back to the OS, so a
    phase does not start on the last one's high-water mark."""
    probe = subprocess.run([sys.executable, "-c", RELEASE_PROBE.format(repo=str(REPO))], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    assert probe.returncode == 0, probe.stderr[-2000:]
    kept, released = map(float, probe.stdout.split()[-2:])
    assert kept - released > 300, (kept, released)


ARENA_PROBE = """
import ctypes, sys, threading
sys.path.insert(0, {repo!r})
from pipeline.heap import share_one_arena

if sys.argv[1] == "shared":
    share_one_arena()  # what `curate` does first

def allocate():
    blocks = [bytearray(2000) for _ in range(2000)]  # over pymalloc's 512 bytes: malloc's own
    del blocks

threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def _arena_count(mode: str) -> int:
    probe = subprocess.run([sys.executable, "-c", ARENA_PROBE.format(repo=str(REPO)), mode], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    assert probe.returncode == 0, probe.stderr[-2000:]
    return sum(line.startswith("Arena ") for line in probe.stderr.splitlines())


def test_threads_share_one_malloc_arena():
    """Threads get malloc arenas of their own by default, which keep what they free; curate's
    processes share one."""
    assert _arena_count("default") > 1
    assert _arena_count("shared") == 1
