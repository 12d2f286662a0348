"""Dataflow readiness: the sdist holds everything the pipeline needs, and runs from the install.

Dataflow's --setup_file builds this project's sdist and pip-installs it on every worker. This test
does the same: builds the sdist, installs it (without dependencies, which the venv already has)
into a fresh folder, and runs a pipeline from there with the repository out of sys.path.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_sdist_installs_and_runs_the_pipeline_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=REPO)
    (sdist,) = glob.glob(f"{dist}/*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    for needed in ("schemas/columns.py", "transforms/download.py", "pipeline/cli.py", "transforms/data/"):
        assert any(needed in name for name in names), needed

    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), sdist])
    assert (target / "pipeline" / "cli.py").exists()

    # A tiny WebDataset input: exercises read, decode, caption, decide and write without network.
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    from pipeline.synthetic import Attributes, encode_jpeg, render

    with wds.TarWriter(str(shard)) as sink:
        for index, colour in enumerate(("red", "blue", "green")):
            attrs = Attributes("circle", colour, "grey")
            sink.write({"__key__": f"{index:09d}", "jpg": encode_jpeg(render(attrs, 300, index)),
                        "txt": attrs.caption(), "json": {"url": f"http://example.invalid/{index}.jpg"}})

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    probe = _run([sys.executable, "-c", "import pipeline.cli, sys; print(pipeline.cli.__file__)"], cwd=tmp_path, env=env)
    assert probe.stdout.strip().startswith(str(target))  # the installed copy, not the checkout
    run = _run([sys.executable, "-m", "pipeline.cli", "run", "--input", str(shard), "--output", str(out),
                "--set", "clip_enabled=false", "--quiet"], cwd=tmp_path, env=env)
    assert "RuntimeWarning" not in run.stderr  # e.g. runpy's, once per phase process
    ledger = pq.read_table(glob.glob(f"{out}/ledger/*.parquet")).to_pylist()
    assert len(ledger) == 3 and all(row["status"] == "kept" for row in ledger)
    assert len(list(wds.WebDataset(glob.glob(f"{out}/shards/*.tar"), shardshuffle=False))) == 3
