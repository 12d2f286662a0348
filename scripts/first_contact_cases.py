"""Issue 20's first-contact cases through the CLI of a checkout: exit code, stderr lines, traceback.

Usage: python scripts/first_contact_cases.py CHECKOUT TAG  (runs CHECKOUT's pipeline.cli with this
interpreter; cases and their files go under /tmp/fc/TAG; prints a TSV row per case)."""
import os, subprocess, sys, shutil, time
repo = sys.argv[1]; tag = sys.argv[2]
work = f"/tmp/fc/{tag}"; shutil.rmtree(work, ignore_errors=True); os.makedirs(work)
rows = "url,caption\n" + "".join(f"http://127.0.0.1:9/img{i}.jpg,a photo of a red bicycle number {i}\n" for i in range(20))
open(f"{work}/rows.csv", "w").write(rows)
open(f"{work}/upper.csv", "w").write(rows.replace("url,caption", "URL,caption"))
open(f"{work}/header.csv", "w").write("url,caption\n")
open(f"{work}/broken.yaml", "w").write("clip_threshold: [0.3\n")
open(f"{work}/afile", "w").write("x")
os.makedirs(f"{work}/notout")
ck = os.path.join(repo, "pipeline/assets/tiny_clip.pt")
off = ["--set", "clip_enabled=false"]
R = f"{work}/rows.csv"
cases = {
 "missing input file": ["run", "--input", f"{work}/nope.csv", *off],
 "glob matching nothing": ["run", "--input", f"{work}/*.parquet", *off],
 "one missing file in a list": ["run", "--input", f"{R},{work}/nope.csv", *off],
 "a folder as input": ["run", "--input", f"{work}/notout", *off],
 "header-only input": ["run", "--input", f"{work}/header.csv", *off],
 "wrong --url-col": ["run", "--input", R, "--url-col", "link", *off],
 "wrong --caption-col": ["run", "--input", R, "--caption-col", "text", *off],
 "column URL, default url": ["run", "--input", f"{work}/upper.csv", *off],
 "url-col = caption-col": ["run", "--input", R, "--url-col", "caption", *off],
 "misspelt flag --sett": ["run", "--input", R, "--sett", "retries=1", *off],
 "--set retries=abc": ["run", "--input", R, "--set", "retries=abc", *off],
 "--set clip_treshold=0.3": ["run", "--input", R, "--set", "clip_treshold=0.3", *off],
 "missing --config": ["run", "--input", R, "--config", f"{work}/nope.yaml", *off],
 "broken --config": ["run", "--input", R, "--config", f"{work}/broken.yaml", *off],
 "missing clip_checkpoint": ["run", "--input", R, "--set", f"clip_checkpoint={work}/nope.pt"],
 "hub weights unreachable": ["run", "--input", R],
 "every download refused": ["run", "--input", R, *off],
 "report on non-output folder": ["report", f"{work}/notout"],
 "report on missing folder": ["report", f"{work}/missing"],
 "output is a file": ["run", "--input", R, *off, "__OUT__", f"{work}/afile"],
 "write before fetch": ["write", *off],
 "unknown command": ["runn", "--input", R],
 "misspelt --runner": ["run", "--input", R, "--runner", "DataFlowRunner", *off],
 "--set languages=german": ["run", "--input", R, "--set", "languages=german", *off],
}
print("case\texit\tstderr_lines\ttraceback\tseconds\tfirst_line")
for i, (name, args) in enumerate(cases.items()):
    out = f"{work}/out{i}"
    if "__OUT__" in args:
        j = args.index("__OUT__"); out = args[j + 1]; args = args[:j]
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if args[0] != "report": cmd += ["--output", out]
    cmd += ["--direct_running_mode", "in_memory"] if args[0] in ("run", "write") else []
    env = dict(os.environ, PYTHONPATH=repo, NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="0")
    t = time.time()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    # The line a user reads first: ours start with "curate:", Python's end a traceback with "...Error:".
    first = next((line for line in err.splitlines() if "rror" in line or "curate:" in line), "")
    print(f"{name}\t{rc}\t{len(err.splitlines())}\t{'Traceback' in err}\t{time.time()-t:.0f}\t{first[:150]}", flush=True)
