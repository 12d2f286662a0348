"""A user's mistakes, tried as a user makes them: `curate ...` in a subprocess of its own.

Every case asserts the exit code, that stderr is short (no traceback), and that it names the
thing that is wrong and the fix. Exit codes: 2 usage/config (before any work starts), 4 the error
ceiling (after the outputs are written), 0 where nothing is wrong but there is nothing to do.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import describe_keys
from pipeline.errors import EXIT_CEILING, EXIT_USAGE
from schemas import Col, DropReason, Status
from tests.conftest import REPO

NO_CLIP = ["--set", "clip_enabled=false"]
FAST = ["--set", "request_deadline_s=3", "--set", "backoff_base_s=0.05", "--set", "backoff_max_s=0.2"]


def curate(*args: str, cwd=None, env: dict = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CURATE_PROGRESS_INTERVAL_S"}
    environment.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, code: int, *needles: str, max_lines: int = 1) -> str:
    """Exit `code`, no traceback, at most `max_lines` lines on stderr besides our progress lines
    (`[curate] ...`), each needle in them."""
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[curate] ")]
    assert result.returncode == code, (result.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert 1 <= len(lines) <= max_lines, err
    assert lines[0].startswith("curate: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def rows_csv(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("url,caption\nhttp://example.invalid/a.jpg,a red square on a blue background\n")
    return path


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def test_missing_input_file(tmp_path):
    (tmp_path / "rows.csv").write_text("url,caption\n")
    result = curate("run", "--input", "rowz.csv", "--output", "out", cwd=tmp_path)
    assert_refused(result, EXIT_USAGE, "'rowz.csv'", "no such file", "did you mean 'rows.csv'")
    assert not (tmp_path / "out").exists()  # nothing was created


def test_glob_that_matches_nothing(tmp_path):
    result = curate("run", "--input", "data/*.parquet", "--output", "out", cwd=tmp_path)
    assert_refused(result, EXIT_USAGE, "'data/*.parquet'", "matches no file")


def test_one_missing_file_in_a_comma_separated_list(tmp_path, rows_csv):
    result = curate("run", "--input", f"{rows_csv},{tmp_path}/second.csv", "--output", str(tmp_path / "out"))
    assert_refused(result, EXIT_USAGE, "second.csv", "no such file")


def test_a_folder_as_input(tmp_path, rows_csv):
    result = curate("run", "--input", str(tmp_path), "--output", str(tmp_path / "out"))
    assert_refused(result, EXIT_USAGE, "is a folder", f"'{tmp_path}/*.csv'")


def test_relative_glob_matches_what_the_shell_would(tmp_path):
    """Beam's local matcher finds nothing for `*/rows.csv`; the run must read both files."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.csv").write_text("url,caption\nhttp://127.0.0.1:1/x.jpg,a caption\n")
    result = curate("fetch", "--input", "*/rows.csv", "--output", "out", *NO_CLIP, "--set", "min_caption_words=99",
                    cwd=tmp_path)
    assert result.returncode == EXIT_CEILING, result.stderr  # both rows dropped (caption rule): nothing kept
    features = pq.read_table(glob.glob(f"{tmp_path}/out/features/*.parquet")).to_pylist()
    assert sorted(r[Col.SOURCE_FILE] for r in features) == ["a/rows.csv", "b/rows.csv"]  # the paths as given


def _parquet_bytes(columns: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


A_ROW = "http://example.invalid/a.jpg,a caption here\n"


@pytest.mark.parametrize("name, data, args, needles", [
    # a wrong url or caption column: the file's real columns and the flag to pass
    ("rows.csv", "URL,TEXT\n" + A_ROW, [], ["column 'url'", "URL, TEXT", "--url-col URL"]),  # LAION's spelling
    ("rows.csv", "url,caption\n" + A_ROW, ["--url-col=link"], ["column 'link'", "url, caption", "--url-col url"]),
    ("rows.csv", "image_url,caption\n" + A_ROW, ["--caption-col=text"], ["image_url, caption", "--url-col image_url"]),
    ("rows.csv", "url,TEXT,license\n" + A_ROW.strip() + ",cc0\n", [], ["'caption'", "TEXT, license",
                                                                          "--caption-col TEXT"]),
    ("rows.jsonl", '{"image": "http://example.invalid/a.jpg", "caption": "a caption"}\n', [],
     ["key 'url'", "image, caption", "--url-col image"]),
    ("p.parquet", _parquet_bytes({"URL": ["http://example.invalid/a.jpg"], "TEXT": ["a caption"]}), [],
     ["column 'url'", "--url-col URL"]),
    # not the format it is read as
    ("rows.csv", A_ROW, [], ["no header line", "url,caption"]),
    ("rows.csv", "url;caption\nhttp://example.invalid/a.jpg;a caption here\n", [], ["semicolon-separated", "rows.csv"]),
    ("tabs.csv", "url\tcaption\nhttp://example.invalid/a.jpg\ta caption here\n", [],
     ["tab-separated", "--input-format tsv"]),
    ("p.parquet", _parquet_bytes({"url": ["http://example.invalid/a.jpg"], "caption": ["a caption"]}),
     ["--input-format", "csv"], ["binary", "--input-format"]),
    ("rows.csv.gz", b"this is not gzip data at all", [], ["cannot read", "rows.csv.gz"]),
    ("rows.txt", "url,caption\n" + A_ROW, [], ["rows.txt", "--input-format"]),
    ("bad.parquet", b"PAR1 but not really", [], ["cannot read", "bad.parquet"]),
    ("rows.jsonl", "url,caption\n" + A_ROW, [], ["rows.jsonl", "JSON object", "--input-format"]),
])
def test_input_file_mistakes(tmp_path, name, data, args, needles):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    assert_refused(curate("run", "--input", str(path), "--output", str(tmp_path / "out"), *args), EXIT_USAGE, *needles)
    assert not (tmp_path / "out").exists()


def test_input_with_no_rows(tmp_path):
    (tmp_path / "rows.csv").write_text("url,caption\n")
    assert_refused(curate("run", "--input", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "out")),
                   EXIT_USAGE, "no rows", "rows.csv")


def test_input_inside_a_folder_the_run_replaces(tmp_path):
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "rows.csv").write_text("url,caption\nhttp://example.invalid/a.jpg,a b c\n")
    assert_refused(curate("run", "--input", str(tmp_path / "out/shards/rows.csv"), "--output", str(tmp_path / "out")),
                   EXIT_USAGE, "which this run replaces")


# ---------------------------------------------------------------------------------------------
# Flags and config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--sett", "retries=1"], ["unknown flag --sett", "did you mean --set?"]),
    (["--url_col", "link"], ["unknown flag --url_col", "--url-col"]),
    (["--runer", "DirectRunner"], ["unknown flag --runer", "--runner"]),  # close to a Beam option
    (["--direct_num_workers", "two"], ["--direct_num_workers", "two"]),  # Beam's option, Beam's type
    (["--runner", "Dirrect"], ["--runner Dirrect", "Valid values are"]),
    (["--runner", "DataflowRunner"], ["--runner DataflowRunner", "project", "region", "temp_location"]),
    (["--set", "retries=abc"], ["retries", "integer", "'abc'"]),
    (["--set", "clip_treshold=0.3"], ["clip_treshold", "did you mean clip_threshold?", "curate config"]),
    (["--set", "retries"], ["--set expects key=value"]),
    (["--set", "languages=german"], ["'german'", "did you mean de?"]),
    (["--set", "clip_device=gpu"], ["clip_device", "auto, cpu, cuda"]),
    (["--set", "clip_threshold=28"], ["clip_threshold", "between -1.0 and 1.0"]),
    (["--set", "samples_per_shard=0"], ["samples_per_shard", "positive"]),
    (["--input-format", "xml"], ["--input-format", "'xml'"]),
    (["--config", "nope.yaml"], ["--config 'nope.yaml'", "no such file"]),
    (["--input", "other.csv"], ["--input is given twice", "--input a.csv,b.csv"]),  # argparse keeps the last
    (["--allow-host", "localhost"], ["--allow-host expects HOST:PORT", "'localhost'"]),
    (["--url-col", "caption"], ["url_col and caption_col", "'caption'"]),
])
def test_flag_and_config_mistakes(rows_csv, tmp_path, args, needles):
    result = curate("run", "--input", str(rows_csv), "--output", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert_refused(result, EXIT_USAGE, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needles", [
    ("retries: [1\nclip_threshold: 0.3\n", ["not valid YAML", "line"]),
    ("- retries\n- 1\n", ["must be a mapping"]),
    ("retries: 1\nclip_treshold: 0.3\n", ["clip_treshold", "my.yaml", "clip_threshold"]),
    ("retries: true\n", ["retries expects an integer"]),
])
def test_broken_config_files(rows_csv, tmp_path, text, needles):
    (tmp_path / "my.yaml").write_text(text)
    result = curate("run", "--input", str(rows_csv), "--output", str(tmp_path / "out"), "--config", "my.yaml",
                    cwd=tmp_path)
    assert_refused(result, EXIT_USAGE, *needles)


def test_unknown_command_and_no_command():
    assert_refused(curate("rnu"), EXIT_USAGE, "unknown command 'rnu'", "did you mean run?")
    assert_refused(curate(), EXIT_USAGE, "no command", "run|fetch")
    assert_refused(curate("run", "--output", "x"), EXIT_USAGE, "--input")


# ---------------------------------------------------------------------------------------------
# Output folders and phase order
# ---------------------------------------------------------------------------------------------


def test_output_path_that_is_a_file(rows_csv, tmp_path):
    assert_refused(curate("run", "--input", str(rows_csv), "--output", str(rows_csv)), EXIT_USAGE,
                   "is a file", "give a folder")
    assert_refused(curate("run", "--input", str(rows_csv), "--output", f"{rows_csv}/out"), EXIT_USAGE,
                   "cannot be created", "is a file")


def test_phases_out_of_order(tmp_path):
    out = str(tmp_path / "out")
    assert_refused(curate("decide", "--output", out), EXIT_USAGE, "run `curate fetch`", out)
    assert_refused(curate("decide", "--output", out, "--input", "rows.csv"), EXIT_USAGE, "drop --input")
    os.makedirs(f"{out}/run")
    with open(f"{out}/run/fetch.json", "w") as handle:
        json.dump({"fingerprint": "x"}, handle)
    assert_refused(curate("write", "--output", out), EXIT_USAGE, "decide phase", "run `curate decide`")
    assert_refused(curate("fetch", "--output", str(tmp_path / "empty"), "--input", "x", "--retry-failed"),
                   EXIT_USAGE, "--retry-failed needs a finished fetch phase")


def test_report_on_a_folder_that_is_not_an_output_folder(tmp_path):
    assert_refused(curate("report", str(tmp_path / "nowhere")), EXIT_USAGE, "does not exist")
    assert_refused(curate("report", str(tmp_path)), EXIT_USAGE, "not a curate output folder")
    assert not (tmp_path / "report").exists()  # no empty report written there


# ---------------------------------------------------------------------------------------------
# The CLIP model is resolved before any work starts
# ---------------------------------------------------------------------------------------------


def test_missing_clip_checkpoint(rows_csv, tmp_path):
    result = curate("run", "--input", str(rows_csv), "--output", str(tmp_path / "out"),
                    "--set", f"clip_checkpoint={tmp_path}/weights.pt")
    assert_refused(result, EXIT_USAGE, "weights.pt", "does not exist", "--set clip_checkpoint=PATH",
                   "--set clip_enabled=false")
    assert not (tmp_path / "out").exists()


def test_clip_weights_from_an_unreachable_hub(rows_csv, tmp_path):
    """The default weights, a hub that cannot be reached and an empty cache (as offline)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = curate("run", "--input", str(rows_csv), "--output", str(tmp_path / "out"), env=env)
    assert_refused(result, EXIT_USAGE, "ViT-B-32:laion2b_s34b_b79k", "--set clip_checkpoint=PATH",
                   "--set clip_enabled=false")
    assert not glob.glob(f"{tmp_path}/out/**/beam-temp-*", recursive=True)
    assert not (tmp_path / "out").exists()


def test_clip_checkpoint_that_does_not_load_and_unknown_model(rows_csv, tmp_path):
    result = curate("fetch", "--input", str(rows_csv), "--output", str(tmp_path / "out"),
                    "--set", f"clip_checkpoint={rows_csv}")
    assert_refused(result, EXIT_USAGE, "does not load", "clip_enabled=false")
    result = curate("fetch", "--input", str(rows_csv), "--output", str(tmp_path / "out"), "--set", "clip_model=ViT-B-33")
    assert_refused(result, EXIT_USAGE, "'ViT-B-33'", "did you mean ViT-B-32?")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Runs that finish but must not exit 0: the error ceiling
# ---------------------------------------------------------------------------------------------


def test_error_ceiling_when_every_download_fails(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\n" + "".join(f"http://127.0.0.1:1/{i}.jpg,a picture number {i} here\n"
                                              for i in range(20)))
    out = tmp_path / "out"
    result = curate("run", "--input", str(rows), "--output", str(out), "--allow-host", "127.0.0.1:1", *NO_CLIP, *FAST)
    err = assert_refused(result, EXIT_CEILING, "ERROR CEILING", "20 of 20 downloads failed", "connection_error",
                         "http://127.0.0.1:1/", "--set max_download_failure_share=1", max_lines=4)
    assert "rows in:  20" in result.stdout  # the summary is printed and the outputs are written
    assert (out / "report" / "index.html").exists() and glob.glob(f"{out}/ledger/*.parquet")
    accepted = curate("run", "--input", str(rows), "--output", str(out), "--allow-host", "127.0.0.1:1", *NO_CLIP,
                      *FAST, "--set", "max_download_failure_share=1")
    assert accepted.returncode == EXIT_CEILING and "NO SAMPLE KEPT" in accepted.stderr, err  # still empty
    assert "fetch is up to date" in accepted.stderr  # the ceiling keys re-run nothing


def test_error_ceiling_on_internal_errors(server, tmp_path):
    """A features table in which a stage raised on most rows (edited into place: no input makes
    our stages raise): decide and write finish, and write exits 4 naming internal_error."""
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\n" + "".join(f"{server.base_url}/files/good_{i:04d}.jpg,a shape picture number {i}\n"
                                              for i in range(6)))
    out = tmp_path / "out"
    assert curate("fetch", "--input", str(rows), "--output", str(out), "--allow-host", server.allow, *NO_CLIP,
                  *FAST).returncode == 0
    for path in glob.glob(f"{out}/features/*.parquet"):
        table = pq.read_table(path)
        failed = pa.array([i % 3 != 0 for i in range(table.num_rows)])
        status = pa.array([Status.DROPPED if f else s for f, s in zip(failed.to_pylist(), table[Col.STATUS].to_pylist())])
        reason = pa.array([DropReason.INTERNAL_ERROR.value if f else r
                           for f, r in zip(failed.to_pylist(), table[Col.REASON].to_pylist())])
        detail = pa.array(["ValueError: boom" if f else d for f, d in zip(failed.to_pylist(), table[Col.ERROR_DETAIL].to_pylist())])
        for name, column in ((Col.STATUS, status), (Col.REASON, reason), (Col.ERROR_DETAIL, detail)):
            table = table.set_column(table.schema.get_field_index(name), name, column)
        pq.write_table(table, path)
    assert curate("decide", "--output", str(out), *NO_CLIP).returncode == 0
    result = curate("write", "--output", str(out), *NO_CLIP)
    assert_refused(result, EXIT_CEILING, "internal_error", "max_internal_error_share=0.01", "ValueError: boom",
                   max_lines=4)


def test_nothing_kept_is_not_a_success(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\nhttp://example.invalid/a.jpg,a short one\nhttp://example.invalid/b.jpg,another\n")
    result = curate("run", "--input", str(rows), "--output", str(tmp_path / "out"), *NO_CLIP,
                    "--set", "min_caption_words=50", "--quiet")
    err = assert_refused(result, EXIT_CEILING, "NO SAMPLE KEPT", "caption_too_short", "example.invalid", max_lines=4)
    assert '"a short one"' in err or '"another"' in err  # an example row: its url and caption
    assert "rows in:  2" in result.stdout  # --quiet hides progress, never the summary


def test_retry_failed_with_nothing_to_retry_says_so_and_skips(server, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"url,caption\n{server.base_url}/files/good_0001.jpg,a shape that is there fine\n"
                    f"{server.base_url}/status/404,a shape that is simply not there\n")
    common = ["--input", str(rows), "--output", str(tmp_path / "out"), "--allow-host", server.allow, *NO_CLIP, *FAST]
    assert curate("run", *common).returncode == 0
    result = curate("run", *common, "--retry-failed")
    assert result.returncode == 0, result.stderr
    assert "nothing to retry" in result.stderr and "decide is up to date" in result.stderr
    assert "retry round" not in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Help, noise and progress
# ---------------------------------------------------------------------------------------------


def test_each_command_has_its_own_help_and_there_is_a_version():
    run_help = curate("run", "--help")
    assert run_help.returncode == 0
    for flag in ("--input", "--output", "--input-format", "--url-col", "--caption-col", "--config", "--set",
                 "--allow-host", "--force", "--retry-failed", "--quiet"):
        assert flag in run_help.stdout, flag
    for words in ("csv, tsv", "jsonl", "parquet", "webdataset", "Beam options pass straight through", "--runner",
                  "exit codes", "4  error ceiling"):
        assert words in run_help.stdout, words
    decide_help = curate("decide", "--help").stdout
    assert "--input" not in decide_help and "features" in decide_help
    assert curate("report", "--help").stdout != run_help.stdout
    version = curate("--version")
    assert version.returncode == 0 and re.match(r"curate \d+\.\d+\.\d+", version.stdout)


def test_config_command_lists_every_key():
    result = curate("config")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line and not line[0].isspace()}
    keys = {row["key"] for row in describe_keys()}
    assert keys <= listed
    assert all(row["meaning"] and row["type"] and row["phase"] for row in describe_keys())
    line = next(line for line in result.stdout.splitlines() if line.startswith("clip_threshold "))
    assert "0.28" in line and "decide" in line and "a number" in line
    shown = json.loads(curate("config", "retries", "--set", "retries=5", "--json").stdout)
    assert shown == [dict(shown[0], key="retries", default=2, value=5)]
    assert_refused(curate("config", "--set", "retries=x"), EXIT_USAGE, "retries expects an integer")


def test_terminal_is_quiet_and_beam_logs_go_to_a_file(server, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"url,caption\n{server.base_url}/files/good_0002.jpg,a shape that is there fine\n")
    out = tmp_path / "out"
    result = curate("run", "--input", str(rows), "--output", str(out), "--allow-host", server.allow, *NO_CLIP, *FAST,
                    "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")
    assert result.returncode == 0, result.stderr
    assert "apitools" not in result.stderr and "INFO" not in result.stderr and "WARNING" not in result.stderr
    assert all(line.startswith("[curate] ") for line in result.stderr.splitlines()), result.stderr
    log = (out / "run" / "beam.log").read_text()
    assert "sdk_worker" in log or "apache_beam" in log  # Beam's worker output went here
    # the DirectRunner would hand the phase to Prism first (online: download it and run there)
    assert "Prism" not in log and "prism" not in log


def test_progress_off_a_terminal_is_honest(server, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\n" + "".join(
        f"{server.base_url}/files/good_{i % 40:04d}.jpg,a shape picture number {i} on a background\n"
        for i in range(120)))
    result = curate("fetch", "--input", str(rows), "--output", str(tmp_path / "out"), "--allow-host", server.allow,
                    *NO_CLIP, *FAST, env={"CURATE_PROGRESS_INTERVAL_S": "0.3"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[curate] fetch:")]
    assert lines, result.stderr
    assert not any(re.search(r"-\d[\d.,]* rows/s", line) for line in lines)
    final = lines[-1]
    assert re.match(r"\[curate\] fetch: rows done 120 rows \(100%\) in \d+s", final), final
    for line in lines[:-1]:
        done = re.search(r"rows done (\d[\d,]*)/120 rows \((\d+)%\)", line)
        if done:
            assert int(done.group(2)) < 100 or done.group(1) == "120", line
            eta = re.search(r"ETA ([^,\s]+)", line).group(1)
            seconds = re.search(r"(\d+)s elapsed", line)
            assert eta in ("estimating", "finishing") or int(seconds.group(1)) >= 20, line
    # without the variable, off a terminal: a line every 30 s at most (this run has none before its end)
    quiet = curate("fetch", "--input", str(rows), "--output", str(tmp_path / "out2"), "--allow-host", server.allow,
                   *NO_CLIP, *FAST)
    assert len([line for line in quiet.stderr.splitlines() if "rows/s, ETA" in line]) <= 2, quiet.stderr


# ---------------------------------------------------------------------------------------------
# What a user trains on
# ---------------------------------------------------------------------------------------------


def _png(size: int, seed: int) -> bytes:
    image = Image.new("RGB", (size, size), (20 + seed * 40 % 200, 90, 160))
    for x in range(size):
        for y in range(0, size, 3):
            image.putpixel((x, y), ((x * 7 + seed * 13) % 255, (y * 5) % 255, (x * y + seed) % 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_samples_carry_clean_text_and_their_extra_columns_apart(server, tmp_path):
    files = server.root / "files"
    for i in range(4):
        (files / f"extra_{i}.png").write_bytes(_png(96, i))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # csv and jsonl give the same columns different types; `sha256`, `width`, `lang` and `key` would shadow ours
    (tmp_path / "a" / "rows.csv").write_text(
        "url,caption,sha256,width,lang,key,n\n"
        f"{server.base_url}/files/extra_0.png,<b>A striped</b> picture &amp; its colours https://x.test/z,abc,7,xx,k0,3\n"
        f"{server.base_url}/files/extra_1.png,a second striped picture here,def,8,yy,k1,4\n")
    (tmp_path / "b" / "rows.csv").write_text(
        "url,caption,n\n" f"{server.base_url}/files/extra_2.png,a third striped picture there,5\n")
    (tmp_path / "c.jsonl").write_text(json.dumps(
        {"url": f"{server.base_url}/files/extra_3.png", "caption": "a fourth striped picture too", "n": 6,
         "width": 9, "nested": {"k": [1, 2]}}) + "\n")
    out = tmp_path / "out"
    result = curate("run", "--input", "a/rows.csv,b/rows.csv,c.jsonl", "--output", "out", "--allow-host",
                    server.allow, *NO_CLIP, *FAST, "--set", "dedup_near=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import webdataset as wds

    samples = [s for tar in sorted(glob.glob(f"{out}/shards/*.tar")) for s in wds.WebDataset(tar, shardshuffle=False)]
    metas = [json.loads(s["json"]) for s in samples]
    assert len(samples) == 4
    by_caption = {m[Col.CAPTION]: (s, m) for s, m in zip(samples, metas)}
    sample, meta = by_caption["<b>A striped</b> picture &amp; its colours https://x.test/z"]
    assert sample["txt"].decode() == "A striped picture & its colours"  # KEY.txt: the clean caption
    assert meta["extra"] == {"sha256": "abc", "width": "7", "lang": "xx", "key": "k0", "n": "3"}
    assert meta[Col.SHA256] != "abc" and meta[Col.WIDTH] != "7" and meta[Col.KEY] == sample["__key__"]
    assert by_caption["a fourth striped picture too"][1]["extra"] == {"n": "6", "width": "9", "nested": '{"k": [1, 2]}'}
    table = pa.Table.from_pylist(metas)  # one schema over every sample (what Hugging Face infers)
    assert pa.types.is_struct(table.schema.field("extra").type)
    ledger = pq.read_table(glob.glob(f"{out}/ledger/*.parquet")).to_pylist()
    assert sorted(r[Col.SOURCE_FILE] for r in ledger) == ["a/rows.csv", "a/rows.csv", "b/rows.csv", "c.jsonl"]


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_img2dataset_shards_are_judged_by_their_original(tmp_path):
    """img2dataset upscales a 12x12 original to 256x256 (border): its json says what it was."""
    tiny = Image.new("RGB", (12, 12), (200, 30, 30))
    upscaled = Image.new("RGB", (256, 256), (255, 255, 255))
    upscaled.paste(tiny.resize((256, 256)), (0, 0))
    for x in range(0, 256, 2):
        upscaled.putpixel((x, x), (0, 0, 0))
    buffer = io.BytesIO()
    upscaled.save(buffer, format="JPEG")
    good = Image.open(io.BytesIO(_png(256, 3))).convert("RGB")
    good_bytes = io.BytesIO()
    good.save(good_bytes, format="JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        for key, image, meta in (
            ("000000000", buffer.getvalue(), {"url": "http://h/tiny.jpg", "original_width": 12, "original_height": 12,
                                              "width": 256, "height": 256, "sha256": "a" * 64, "status": "success"}),
            ("000000001", good_bytes.getvalue(), {"url": "http://h/good.jpg", "original_width": 1024,
                                                  "original_height": 1024, "sha256": "b" * 64}),
        ):
            _tar_member(archive, f"{key}.jpg", image)
            _tar_member(archive, f"{key}.txt", f"a picture with key {key} inside".encode())
            _tar_member(archive, f"{key}.json", json.dumps(meta).encode())
    out = tmp_path / "out"
    result = curate("run", "--input", str(tmp_path / "00000.tar"), "--output", str(out), *NO_CLIP)
    assert result.returncode == 0, result.stderr
    ledger = {r[Col.URL]: r for r in pq.read_table(glob.glob(f"{out}/ledger/*.parquet")).to_pylist()}
    assert ledger["http://h/tiny.jpg"][Col.REASON] == DropReason.TOO_SMALL.value
    assert ledger["http://h/good.jpg"][Col.STATUS] == Status.KEPT
    assert ledger["http://h/good.jpg"][Col.SHA256] == "b" * 64
    assert (ledger["http://h/good.jpg"][Col.ORIGINAL_WIDTH], ledger["http://h/good.jpg"][Col.WIDTH]) == (1024, 256)


def test_a_failed_phase_leaves_no_beam_temp_folders(tmp_path):
    """What `curate` does when a pipeline raises (WriteToParquet leaves beam-temp-* behind)."""
    from pipeline.cli import _remove_beam_temp
    from pipeline.layout import Layout

    layout = Layout(str(tmp_path))
    for folder in ("features/beam-temp-survivors-1a2b", "ledger/beam-temp-ledger-3c4d"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "part.parquet").write_bytes(b"x")
    (tmp_path / "features" / "kept.parquet").write_bytes(b"x")
    _remove_beam_temp(layout)
    assert not glob.glob(f"{tmp_path}/*/beam-temp-*") and (tmp_path / "features" / "kept.parquet").exists()


def test_the_command_exits_with_mains_code_after_the_exit_handlers_and_a_flush():
    """`entry` leaves by os._exit (no interpreter finalisation, see its docstring): what main()
    returned is the exit code, atexit handlers still run, and output still buffered is written."""
    script = ("import atexit; from pipeline import cli; "
              "atexit.register(lambda: print(' and the handler ran', end='')); "
              "cli.main = lambda: (print('said', end=''), 3)[1]; cli.entry()")
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (3, "said and the handler ran"), result.stderr[-2000:]


def test_a_run_from_a_folder_with_packages_named_like_ours_runs_our_code(tmp_path):
    """`curate run` starts each phase from multiprocessing's fork server, a `python -c` process
    whose path begins with the current folder (Python 3.11's ignores the path it is handed): its
    preloads imported a `pipeline/` there (another checkout of curate, a project's own package)
    and every phase ran that code. Here the folder's `pipeline/cli.py` only leaves a mark."""
    from pipeline.errors import EXIT_CEILING

    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "pipeline" / "__init__.py").write_text("")
    marker = tmp_path / "imported"
    (project / "pipeline" / "cli.py").write_text(f"open({str(marker)!r}, 'w').write('the folder\\'s cli')\n")
    (project / "rows.csv").write_text("url,caption\nhttp://example.invalid/a.jpg,a red circle on a grey card\n")
    launcher = tmp_path / "bin" / "curate_main.py"  # like the console script: its folder, not the cwd, on the path
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom pipeline.cli import entry\nif __name__ == '__main__':\n"
                        "    sys.argv[0] = 'curate'\n    entry()\n")
    result = subprocess.run([sys.executable, str(launcher), "run", "--input", "rows.csv", "--output", "out",
                             "--set", "clip_enabled=false", "--set", "retries=0", "--quiet"], cwd=project,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    # the one row failed to download (no such host): written, refused by the failure ceiling
    assert result.returncode == EXIT_CEILING, result.stderr[-3000:]
    assert (project / "out" / "ledger").is_dir()
