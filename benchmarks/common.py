"""Helpers shared by the benchmarks: a local server, photo-like images, process-tree timing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.progress import ProcessTree  # noqa: E402


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour fields plus grain: compresses like a photo, unlike flat clip art."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(field, np.float32) + grain, 0, 255).astype(np.uint8))


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 3600) -> dict:
    """Wall time and peak RSS summed over the whole process tree (img2dataset forks workers), and
    the CPU seconds of the tree (its reaped processes: steadier than wall time on a busy machine)."""
    import resource

    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree, peak = ProcessTree(process.pid), 0
    while process.poll() is None:
        peak = max(peak, tree.rss_bytes())
        if time.monotonic() - started > timeout:
            process.kill()
            raise TimeoutError(" ".join(command))
        time.sleep(0.2)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}):\n{output[-3000:]}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"seconds": time.monotonic() - started, "peak_rss_mb": peak / 2**20, "output": output, "cpu_seconds": cpu}


class BenchServer:
    def __init__(self, root: Path, latency_ms: float):
        from pipeline.demo import start_server

        self.process, self.port = start_server(root, latency_ms)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=10)
