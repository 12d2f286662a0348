"""Shared fixtures: a real local HTTP server (subprocess, 127.0.0.1 only) and one demo run."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import demo  # noqa: E402
from pipeline.config import build_config  # noqa: E402


def in_process_pipeline() -> TestPipeline:
    """The in-process runner: the default DirectRunner may try to download Prism (offline here)."""
    return TestPipeline(runner=FnApiRunner())


class LocalServer:
    def __init__(self, root: Path, latency_ms: float = 0.0):
        self.root = root
        self.process, self.port = demo.start_server(root, latency_ms)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.allow = f"127.0.0.1:{self.port}"

    def stats(self, reset: bool = False) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/stats{'?reset=1' if reset else ''}", timeout=5) as response:
            return json.loads(response.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    local = LocalServer(root)
    demo.make_corpus(root, local.base_url, good=64)  # enough for every planted kind
    yield local
    local.close()


@pytest.fixture
def fast_config(server):
    """Config for tests: short deadlines and backoff, the local server allowed."""
    return build_config(
        overrides=["request_deadline_s=3", "backoff_base_s=0.05", "backoff_max_s=0.2", "connect_timeout_s=2"],
        allow_hosts=[server.allow],
    )


TINY_CLIP_ARGS = ["--set", "clip_model=tiny_clip", "--set", f"clip_checkpoint={REPO / 'pipeline/assets/tiny_clip.pt'}"]


def run_cli(*args: str) -> int:
    """`curate ...` in-process. Tests score with the tiny CLIP the project trains itself (no hub here)."""
    from pipeline.cli import main

    if args[0] not in ("run", "fetch", "decide", "write"):  # report and config take no config keys
        return main(list(args))
    clip_args = [] if any(a.startswith(("clip_enabled", "clip_checkpoint")) for a in args) else TINY_CLIP_ARGS
    return main(list(args) + clip_args + ["--quiet"])


@pytest.fixture(scope="session")
def demo_output(server, tmp_path_factory):
    """One full `curate run` over the demo corpus, shared by the end-to-end tests.

    The deadline (6 s; the stalled and dripping rows cost 3 attempts of it) leaves room for the
    start of a run: lingua loads each language's models the first time a caption needs them, in
    native code holding the GIL, and that froze the whole process (its download loop included)
    for up to ~3.5 s on this machine. A 3 s deadline then timed out a first request now and then,
    and its row's `attempts` made the determinism test's two ledgers differ."""
    out = tmp_path_factory.mktemp("demo_out")
    code = run_cli(
        "run", "--input", str(server.root / "rows.csv"), "--output", str(out), "--allow-host", server.allow,
        "--set", "request_deadline_s=6", "--set", "samples_per_shard=16", "--set", "backoff_base_s=0.05",
    )
    assert code == 0
    return out


def write_features(records: list[dict], directory: Path, files: int = 1) -> None:
    """Feature records (dicts keyed by Col names; status kept unless given) as a features table of
    `files` Parquet files under directory/features, the way the fetch phase leaves it."""
    import pyarrow.parquet as pq

    from schemas import FEATURES_SCHEMA, Col, Status, to_table

    (directory / "features").mkdir(parents=True, exist_ok=True)
    full = []
    for index, record in enumerate(records):
        row = {Col.STATUS: Status.KEPT, Col.SOURCE_FILE: "rows.csv", Col.SOURCE_ROW: index}
        row.update(record)
        full.append(row)
    for part in range(files):
        chunk = full[part::files]
        pq.write_table(to_table(chunk, FEATURES_SCHEMA), directory / "features" / f"survivors-{part:05d}.parquet",
                       row_group_size=64)


def run_decide(records: list[dict], directory: Path, **config) -> tuple[dict, dict]:
    """The decide phase (in-process) on feature records -> ({uid: decision row}, {counter: value})."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import CurateConfig
    from pipeline.decide import build_decide
    from pipeline.layout import Layout

    directory.mkdir(parents=True, exist_ok=True)
    write_features(records, directory)
    settings = {"clip_threshold": -1.0}
    settings.update(config)
    layout = Layout(str(directory))
    pipeline = in_process_pipeline()
    build_decide(pipeline, CurateConfig(output=str(directory), **settings), layout)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {}
    for counter in result.metrics().query()["counters"]:
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + counter.committed
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{directory}/decisions/*.parquet"))])
    return {row["uid"]: row for row in table.to_pylist()}, counters
