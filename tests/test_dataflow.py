"""Every phase's graph translates into a Dataflow job offline, as Beam's own DataflowRunner tests do:
its transforms, coders and pickled functions are checked by the translation, nothing is submitted."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import phase_builder
from pipeline.config import build_config
from pipeline.layout import Layout
from tests.conftest import REPO

pytest.importorskip("apache_beam.runners.dataflow.dataflow_runner")
pytest.importorskip("apitools", reason="apache-beam[gcp] is in requirements.txt")

# A project id and bucket that pass Beam's validation: an invalid one makes it look the default
# bucket up over the network and hang.
DRY_RUN = [
    "--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--sdk_location=container",
    "--project=curate-test-project", "--region=us-central1",
    "--temp_location=gs://curate-test-bucket/tmp", "--staging_location=gs://curate-test-bucket/staging",
]


@pytest.mark.parametrize("phase", ["fetch", "decide", "write"])
def test_phase_translates_into_a_dataflow_job_offline(phase, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\nhttp://example.com/a.jpg,a cat on a mat\n")
    config = build_config(
        overrides=["clip_model=tiny_clip", f"clip_checkpoint={REPO / 'pipeline/assets/tiny_clip.pt'}"],
        input="gs://curate-test-bucket/rows-*.csv", output="gs://curate-test-bucket/out",
    )
    pipeline = beam.Pipeline(options=PipelineOptions(DRY_RUN))
    phase_builder(phase)(pipeline, config, Layout(config.output))
    job = pipeline.run().job  # dry run: translated (transforms, coders, pickled functions), not submitted
    names = {t.unique_name.split("/")[0] for t in job.proto_pipeline.components.transforms.values()}
    assert job.proto.name and EXPECTED_STEPS[phase] <= names, EXPECTED_STEPS[phase] - names


EXPECTED_STEPS = {
    "fetch": {"Read", "CollapseDuplicateRows", "Caption", "Fetch", "Clip"},
    "decide": {"ReadFeatures", "Verdicts", "SpillAlive", "SpillImage", "SpillText", "NearDedup", "WriteDecisions"},
    "write": {"ReadFeatures", "ReadDecisions", "Ledger", "WriteShards"},
}
