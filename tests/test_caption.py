"""Caption stage: cleaning rules, caption rules, language ID, determinism, the Beam stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import CurateConfig, build_config
from schemas import Col, DropReason, Status
from transforms.caption import (
    CaptionStage,
    annotate_caption,
    caption_rule_violation,
    clean_caption,
    count_words,
    detect_language,
    is_boilerplate,
    language_drop_reason,
)

REPO = Path(__file__).resolve().parents[1]
CFG = CurateConfig()


# ---- cleaning, one rule at a time ---------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, ""),
        ("", ""),
        ("cafÃ© au lait", "café au lait"),  # ftfy: mojibake
        ("ｆｕｌｌｗｉｄｔｈ text", "fullwidth text"),  # ftfy: width
        ("<b>A red</b> <i>bicycle</i>", "A red bicycle"),  # tags stripped
        ("Tom &amp; Jerry &lt;3", "Tom & Jerry <3"),  # entities unescaped
        ("&lt;p&gt;a dog&lt;/p&gt;", "a dog"),  # escaped tags revealed, then stripped
        ("x < y > z holds", "x < y > z holds"),  # not a tag
        ("a cat https://example.com/a.jpg?x=1 on a mat", "a cat on a mat"),  # URL
        ("see www.example.org for more", "see for more"),  # www URL
        ("mail me: jane.doe+x@mail.example.co.uk now", "mail me: now"),  # e-mail
        ("a\x00b\x07c\td\ne", "a b c d e"),  # control characters
        ("zero\u200bwidth \u202eevil\u202c text", "zerowidth evil text"),  # invisible / bidi
        ("lone \ud800surrogate", "lone surrogate"),  # unencodable
        ("  lots   of \n\n  space  ", "lots of space"),  # whitespace collapsed
    ],
)
def test_clean_caption_rules(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_keeps_text_encodable_and_non_string_input():
    out = clean_caption("bad \udcff\ud83d bytes &#xD800; end")
    out.encode("utf-8")  # must not raise
    assert clean_caption(12345) == "12345"


# ---- caption rules -------------------------------------------------------------------------
def test_too_short_is_datacomp_basic_filter():
    # more than 2 words and more than 5 characters
    assert caption_rule_violation("a red bicycle", CFG) is None
    assert caption_rule_violation("red bicycle", CFG) == DropReason.CAPTION_TOO_SHORT
    assert caption_rule_violation("a b c", CFG) == DropReason.CAPTION_TOO_SHORT  # 5 chars
    assert caption_rule_violation("a b cd", CFG) is None  # 6 chars, 3 words
    assert caption_rule_violation("", CFG) == DropReason.CAPTION_TOO_SHORT


def test_too_short_is_configurable_and_counts_cjk_characters_as_words():
    loose = build_config(overrides=["min_caption_words=1", "min_caption_chars=1"])
    assert caption_rule_violation("bicycle", loose) is None
    assert count_words("一只猫坐在沙发上") == 8
    assert caption_rule_violation("一只猫坐在沙发上", CFG) is None


def test_too_long():
    cfg = build_config(overrides=["max_caption_chars=20"])
    assert caption_rule_violation("a" * 10 + " " + "b" * 10, cfg) == DropReason.CAPTION_TOO_LONG
    assert caption_rule_violation("a short caption", cfg) is None


@pytest.mark.parametrize(
    "caption",
    ["IMG_2187.jpg", "IMG_2187", "DSC0001", "DSCN1234.JPG", "P1010001", "holiday photo 2.jpeg",
     "image", "Image 3", "untitled", "Untitled-1", "click here", "Click here to enlarge!",
     "www.example.com/pic", "example.com", "12345", "!!!"],
)
def test_boilerplate(caption):
    assert is_boilerplate(caption)
    assert caption_rule_violation(caption, CFG) == DropReason.CAPTION_BOILERPLATE


@pytest.mark.parametrize(
    "caption", ["a dog running on the beach", "image of a dog on the beach", "Untitled Goose Game poster"]
)
def test_not_boilerplate(caption):
    assert not is_boilerplate(caption)


def test_bare_url_is_boilerplate_even_though_cleaning_removes_it():
    raw = "https://cdn.example.com/photos/12345.jpg"
    assert clean_caption(raw) == ""
    assert caption_rule_violation(clean_caption(raw), CFG, raw=raw) == DropReason.CAPTION_BOILERPLATE


def test_boilerplate_rule_can_be_switched_off():
    cfg = build_config(overrides=["drop_boilerplate_captions=false"])
    assert caption_rule_violation("IMG_2187.jpg", cfg) == DropReason.CAPTION_TOO_SHORT


# ---- language ID ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, lang",
    [
        ("A brown dog is running across the green field", "en"),
        ("Ein brauner Hund läuft über die grüne Wiese", "de"),
        ("Un chien brun court à travers le champ vert", "fr"),
        ("Un perro marrón corre por el campo verde", "es"),
        ("Um cão castanho corre pelo campo verde", "pt"),
        ("Коричневая собака бежит по зелёному полю", "ru"),
        ("Коричневий собака біжить через зелене поле", "uk"),
        ("茶色の犬が緑の野原を走っています", "ja"),
        ("一只棕色的狗在绿色的田野上奔跑", "zh"),
        ("갈색 개가 초록 들판을 가로질러 달리고 있다", "ko"),
        ("Ένας καφέ σκύλος τρέχει στο πράσινο χωράφι", "el"),
        ("GNU Objective-C++ コンパイラ", "ja"),  # mostly Latin letters, still Japanese
    ],
)
def test_detect_language(text, lang):
    got, score = detect_language(text)
    assert got == lang and 0.5 <= score <= 1.0


@pytest.mark.parametrize(
    "text, lang, voted",
    [
        # short lower-case English alt text: fastText's raw top probability is below 0.7 (it gives
        # the rest to languages of other scripts), its share among Latin-script languages is not
        ("a red circle on a grey background", "en", False),
        ("Stock Photo - Young woman drinking coffee at home", "en", False),
        ("Ein brauner Hund läuft über die grüne Wiese", "de", False),
        # fastText unsure (French "beige" in English text): the vote decides
        ("a blue circle on a beige background", "en", True),
        # a language with confusable siblings (pt: es, gl, ca) below a 0.9 share: the vote decides
        ("o cão castanho do vizinho", "pt", True),
    ],
)
def test_fasttext_decides_clear_captions_and_the_vote_the_ambiguous_ones(monkeypatch, text, lang, voted):
    import transforms.caption as caption

    calls = []
    real = caption._py3langid_probs
    monkeypatch.setattr(caption, "_py3langid_probs", lambda t, allowed: calls.append(t) or real(t, allowed))
    ft = caption._fasttext_probs(text, caption._latin_languages())
    top, prob = caption._best(ft)
    assert caption.fasttext_is_sure(top, prob, ft) is not voted
    assert detect_language(text)[0] == lang
    assert bool(calls) is voted


@pytest.mark.parametrize("text", ["", "   ", "😀😂🎉👍", "1234567890", "3.14 + 2 = 5.14 !!!", "\x00\x01"])
def test_no_language_is_und(text):
    assert detect_language(text) == ("und", 0.0)


def test_low_confidence_is_und_not_a_guess():
    lang, score = detect_language("ok", min_score=0.999)
    assert lang == "und" and score < 0.999


def test_mixed_script_caption_gets_an_answer():
    lang, score = detect_language("Москва Moscow 莫斯科 Moskau")
    assert lang != "" and 0.0 <= score <= 1.0


def test_huge_caption_is_bounded():
    text = "a brown dog on the beach " * 40_000 + "\ud800"  # ~1 MB
    start = time.perf_counter()
    assert detect_language(text)[0] == "en"
    record = annotate_caption({Col.CAPTION: text}, CFG)
    assert time.perf_counter() - start < 5
    assert record[Col.REASON] == DropReason.CAPTION_TOO_LONG.value and record[Col.LANG] == "en"


@pytest.mark.parametrize("backend", ["fasttext", "lingua", "lingua_low", "langdetect"])
def test_other_backends(backend):
    assert detect_language("A brown dog is running across the green field", backend=backend)[0] == "en"
    assert detect_language("", backend=backend) == ("und", 0.0)


def test_unknown_backend_fails_loudly():
    with pytest.raises(ValueError):
        detect_language("hello world", backend="nope")


_DETERMINISM_TEXTS = [
    "Pakker for trommer og takt", "turecký jazykový balík pre Firefox ESR", "Gestor de janelas para o X",
    "Модуль Qt 5 Designer", "ok", "Backup incremental remoto", "Glasgow Haskell Compilation system",
]
_CHILD = (
    "import json, sys; sys.path.insert(0, {repo!r}); from transforms.caption import detect_language; "
    "texts = json.loads(sys.argv[1]); "
    "print(json.dumps([[detect_language(t, b) for t in texts] for b in ('auto', 'langdetect')]))"
)


def test_deterministic_across_processes():
    outputs = []
    for seed in ("1", "2"):  # different hash seeds: set/dict order must not leak into answers
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD.format(repo=str(REPO)), json.dumps(_DETERMINISM_TEXTS)],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )
        outputs.append(proc.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]
    here = json.loads(outputs[0])[0]
    assert here == [list(detect_language(t)) for t in _DETERMINISM_TEXTS]


# ---- record level --------------------------------------------------------------------------
def test_annotate_caption_kept():
    record = annotate_caption({Col.CAPTION: "<p>A brown dog runs on the beach</p>"}, CFG)
    assert record[Col.CAPTION] == "<p>A brown dog runs on the beach</p>"  # raw kept
    assert record[Col.CAPTION_CLEAN] == "A brown dog runs on the beach"
    assert record[Col.LANG] == "en" and record[Col.LANG_SCORE] > 0.5
    assert record.get(Col.STATUS) != Status.DROPPED


def test_annotate_caption_dropped_keeps_scores():
    record = annotate_caption({Col.CAPTION: "IMG_2187.jpg"}, CFG)
    assert record[Col.STATUS] == Status.DROPPED
    assert record[Col.REASON] == DropReason.CAPTION_BOILERPLATE.value
    assert Col.LANG in record and Col.LANG_SCORE in record
    assert annotate_caption({Col.CAPTION: None}, CFG)[Col.REASON] == DropReason.CAPTION_TOO_SHORT.value


def test_language_drop_reason():
    assert language_drop_reason("fr", CFG) is None  # default keeps all
    cfg = build_config(overrides=["languages=en,de"])
    assert language_drop_reason("en", cfg) is None
    assert language_drop_reason("fr", cfg) == DropReason.LANGUAGE_NOT_WANTED
    assert language_drop_reason("und", cfg) == DropReason.LANGUAGE_NOT_WANTED
    assert language_drop_reason(None, cfg) == DropReason.LANGUAGE_NOT_WANTED


# ---- Beam ----------------------------------------------------------------------------------
def test_caption_stage_pipeline():
    rows = [
        {Col.UID: "a", Col.CAPTION: "A brown dog runs on the beach"},
        {Col.UID: "b", Col.CAPTION: "DSC0001"},
        {Col.UID: "c", Col.CAPTION: "Ein brauner Hund läuft über die Wiese"},
        {Col.UID: "d", Col.CAPTION: "ok"},
        {Col.UID: "e", Col.CAPTION: "earlier drop", Col.STATUS: Status.DROPPED, Col.REASON: "timeout"},
    ]
    with TestPipeline(runner=FnApiRunner()) as p:
        result = p | beam.Create(rows) | CaptionStage(CFG)
        kept = result.kept | "kept" >> beam.Map(lambda r: (r[Col.UID], r[Col.LANG], r[Col.CAPTION_CLEAN]))
        dropped = result.dropped | "dropped" >> beam.Map(lambda r: (r[Col.UID], r[Col.REASON]))
        assert_that(
            kept,
            equal_to([("a", "en", "A brown dog runs on the beach"), ("c", "de", "Ein brauner Hund läuft über die Wiese")]),
            label="kept",
        )
        assert_that(
            dropped,
            equal_to([("b", "caption_boilerplate"), ("d", "caption_too_short"), ("e", "timeout")]),
            label="dropped",
        )


def test_language_id_can_be_switched_off_while_rules_still_apply():
    from pipeline.config import build_config

    assert detect_language("a red circle on a blue background", backend="none") == ("und", 0.0)
    config = build_config(overrides=["langid_backend=none"])
    record = annotate_caption({Col.CAPTION: "IMG_2187.jpg"}, config)
    assert record[Col.LANG] == "und" and record[Col.REASON] == DropReason.CAPTION_BOILERPLATE.value
