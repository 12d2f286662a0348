"""Language-ID benchmark: ours (transforms.caption, backend "auto") against its peers, one run.

    python benchmarks/langid.py [--data PATH] [--min-score 0.5] [--cores 1]

Data: a TSV of `iso639-1<TAB>text` lines ('#' lines are comments), by default
../shared/data/langid_dev.tsv beside the repository (real short texts in many languages).

Accuracy counts "und" (no answer) as wrong. `wrong|ans` is the share of non-und answers that are
wrong (confident mistakes), `und` the share of texts left undetermined. texts/s is measured on one
core (the process is pinned to one CPU), with every model loaded and warmed up beforehand.
`alt/s` is the same on web-like alt text (the synthetic corpus's English captions, "a red circle on
a grey background", each twice, after one warm-up pass), and `vote%` the share of texts ours sent
past fastText to the slower vote (dev set / alt text).

Peers answer as their libraries do out of the box over all their languages: langdetect (seeded)
top guess, lingua `detect_language_of` (None -> und) in high and low accuracy modes. Ours answers
with `detect_language(text, "auto", min_score)`.

Ours was tuned on the texts whose crc32 is even ("tune" half) and is also reported on the other
("held-out") half, so the overall figure can be read against an untouched one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/langid_dev.tsv"


def load(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lang, _, text = line.partition("\t")
        rows.append((lang.strip().lower(), text))
    return rows


def _norm(code: str) -> str:
    code = code.lower().split("-")[0]
    return {"nb": "no"}.get(code, code)


def make_systems(min_score: float):
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException
    from lingua import LanguageDetectorBuilder

    from transforms.caption import detect_language

    DetectorFactory.seed = 0

    def langdetect_fn(text):
        try:
            return _norm(detect_langs(text)[0].lang)
        except LangDetectException:
            return "und"

    lingua_high = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()
    lingua_low = (
        LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().with_preloaded_language_models().build()
    )

    def lingua_fn(detector):
        def run(text):
            language = detector.detect_language_of(text)
            return _norm(language.iso_code_639_1.name) if language is not None else "und"

        return run

    def ours(text):
        return detect_language(text, backend="auto", min_score=min_score)[0]

    def ours_no_und(text):
        return detect_language(text, backend="auto", min_score=0.0)[0]

    return [
        ("langdetect", langdetect_fn),
        ("lingua-high", lingua_fn(lingua_high)),
        ("lingua-low", lingua_fn(lingua_low)),
        (f"ours(min={min_score:g})", ours),
        ("ours(min=0)", ours_no_und),
    ]


def evaluate(fn, rows):
    for _, text in rows[:20]:  # warm-up: lazy model loads are not part of the timing
        fn(text)
    start = time.perf_counter()
    preds = [fn(text) for _, text in rows]
    seconds = time.perf_counter() - start
    return preds, len(rows) / seconds


def alt_texts() -> list[str]:
    from pipeline.synthetic import all_attributes

    return [attrs.caption() for attrs in all_attributes()] * 2


def alt_rate(fn, texts) -> float:
    for text in texts:  # warm-up pass
        fn(text)
    start = time.perf_counter()
    for text in texts:
        fn(text)
    return len(texts) / (time.perf_counter() - start)


def vote_share(texts) -> float:
    """Share of `texts` the "auto" backend sends past fastText to the vote."""
    import transforms.caption as caption

    calls = []
    real = caption._py3langid_probs
    caption._py3langid_probs = lambda text, allowed: calls.append(1) or real(text, allowed)
    try:
        for text in texts:
            caption.detect_language(text)
    finally:
        caption._py3langid_probs = real
    return len(calls) / len(texts)


def summarize(preds, gold):
    n = len(gold)
    right = sum(p == g for p, g in zip(preds, gold))
    answered = sum(p != "und" for p in preds)
    wrong_answered = sum(p != "und" and p != g for p, g in zip(preds, gold))
    per = defaultdict(lambda: [0, 0])
    for p, g in zip(preds, gold):
        per[g][1] += 1
        per[g][0] += p == g
    return {
        "acc": right / n,
        "wrong_ans": wrong_answered / answered if answered else 0.0,
        "und": (n - answered) / n,
        "per": {lang: ok / total for lang, (ok, total) in per.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--min-score", type=float, default=0.5, help="ours: below it the answer is und")
    parser.add_argument("--cores", type=int, default=1, help="CPUs to pin the process to (default 1)")
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[-args.cores :]
        os.sched_setaffinity(0, set(cpus))
    rows = load(args.data)
    gold = [g for g, _ in rows]
    half = [zlib.crc32(t.encode("utf-8")) % 2 for _, t in rows]
    print(f"data: {args.data} ({len(rows)} texts, {len(set(gold))} languages); pinned to CPU(s) "
          f"{sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")

    results = {}
    alt = alt_texts()
    for name, fn in make_systems(args.min_score):
        preds, rate = evaluate(fn, rows)
        summary = summarize(preds, gold)
        summary["rate"] = rate
        summary["alt_rate"] = alt_rate(fn, alt)
        for part, label in ((0, "tune"), (1, "held-out")):
            idx = [i for i, h in enumerate(half) if h == part]
            summary[label] = summarize([preds[i] for i in idx], [gold[i] for i in idx])["acc"]
        results[name] = summary

    langs = sorted(set(gold))
    header = (f"{'system':<16} {'acc':>6} {'tune':>6} {'held':>6} {'wrong|ans':>9} {'und':>6} {'texts/s':>8} "
              f"{'alt/s':>8}")
    print(header)
    print("-" * len(header))
    for name, s in results.items():
        print(f"{name:<16} {s['acc']:6.3f} {s['tune']:6.3f} {s['held-out']:6.3f} {s['wrong_ans']:9.3f} "
              f"{s['und']:6.3f} {s['rate']:8.0f} {s['alt_rate']:8.0f}")
    print(f"vote%: dev set {100 * vote_share([t for _, t in rows]):.1f}%, alt text {100 * vote_share(alt):.1f}%")
    print()
    print("per-language accuracy")
    print(f"{'lang':<6}" + "".join(f"{name[:14]:>15}" for name in results))
    for lang in langs:
        print(f"{lang:<6}" + "".join(f"{results[name]['per'][lang]:15.3f}" for name in results))
    print()
    ours_name = f"ours(min={args.min_score:g})"
    ours = results[ours_name]
    print(f"{ours_name} vs peers (accuracy ratio, speed ratio)")
    for name, s in results.items():
        if name.startswith("ours"):
            continue
        print(f"  vs {name:<12} acc x{ours['acc'] / s['acc']:.3f}   speed x{ours['rate'] / s['rate']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
