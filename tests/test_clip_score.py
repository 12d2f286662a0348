"""CLIP scoring and the CLIP filter, with the tiny self-trained open_clip checkpoint (no downloads)."""

from __future__ import annotations

import dataclasses
import io
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline import synthetic
from pipeline.config import CurateConfig
from pipeline.tiny_clip import TINY_CLIP_NAME, ensure_tiny_clip
from schemas import Col, DropReason, Status
from transforms import clip_score
from transforms.clip_score import (
    ClipInput,
    ClipScoring,
    OpenClipModelHandler,
    load_open_clip,
)
from tests.conftest import run_decide
from transforms.clip_filter import model_id, quantile_cutoff


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return ensure_tiny_clip()


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision="fp32")


def _config(checkpoint: str = "", **overrides) -> CurateConfig:
    base = dict(clip_model=TINY_CLIP_NAME, clip_pretrained="", clip_checkpoint=checkpoint, clip_device="cpu")
    base.update(overrides)
    return CurateConfig(**base)


def _samples(count: int, seed: int = 11) -> list[tuple[synthetic.Attributes, bytes]]:
    # 256px JPEGs, as the resize stage hands them over
    return [(a, synthetic.encode_jpeg(img)) for a, img in synthetic.iter_samples(count, size=256, seed=seed)]


def _scores(loaded, pairs: list[ClipInput]) -> np.ndarray:
    handler = OpenClipModelHandler(TINY_CLIP_NAME)
    return np.array([r.inference["clip_score"] for r in handler.run_inference(pairs, loaded)])


# ---- pure functions ----------------------------------------------------------------------------


def test_matching_captions_score_clearly_above_swapped(tiny):
    samples = _samples(48)
    captions = [a.caption() for a, _ in samples]
    swapped = captions[1:] + captions[:1]  # another sample's caption: a shuffled alt-text
    match = _scores(tiny, [ClipInput(b, c) for (_, b), c in zip(samples, captions)])
    wrong = _scores(tiny, [ClipInput(b, c) for (_, b), c in zip(samples, swapped)])
    differs = np.array([c != s for c, s in zip(captions, swapped)])
    assert match.mean() - wrong[differs].mean() > 0.3
    assert (match[differs] > wrong[differs]).mean() >= 0.9


def test_dynamic_length_text_equals_full_context(tiny):
    import torch

    captions = ["a red circle on a blue background", "a cat", "a very long and winding caption " * 3]
    tokens = [tiny.prepare(ClipInput(synthetic.encode_jpeg(synthetic.render(synthetic.all_attributes()[0])), c))[1] for c in captions]
    assert max(len(t) for t in tokens) < tiny.context_length  # the batch really is shorter than 77
    full = clip_score.pad_tokens(tokens, tiny.context_length)
    short = clip_score.pad_tokens(tokens)
    with torch.inference_mode():
        reference = tiny.model.encode_text(full)  # open_clip's own full-length path
        dynamic = clip_score.encode_text_dynamic(tiny.model, short)
    assert short.shape[1] < full.shape[1]
    torch.testing.assert_close(dynamic, reference, atol=1e-5, rtol=1e-4)


def test_class_token_only_last_block_is_exact(checkpoint, tiny):
    import open_clip
    import torch

    plain, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=checkpoint)
    plain.eval()
    assert isinstance(tiny.model.visual.transformer.resblocks[-1], clip_score.ClassTokenOnlyBlock)
    pixels = torch.randn(4, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(tiny.model.encode_image(pixels), plain.encode_image(pixels), atol=1e-5, rtol=1e-4)


def test_model_built_without_random_init_holds_exactly_the_checkpoint(checkpoint):
    # load_open_clip skips the fills while open_clip builds a model it then loads: every weight and
    # buffer must come out as with the random init done, and the fills must come back after
    import open_clip
    import torch

    fills_before = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    plain, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=checkpoint)
    with clip_score.weight_init_skipped():
        assert torch.nn.init.normal_(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # skipped inside
        skipped, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=checkpoint)
    assert {name: getattr(torch.nn.init, name) for name in fills_before} == fills_before
    assert torch.nn.init.normal_(torch.zeros(3)).abs().sum() > 0
    plain_state, skipped_state = plain.state_dict(), skipped.state_dict()
    assert plain_state.keys() == skipped_state.keys()
    for name, tensor in plain_state.items():
        assert torch.equal(skipped_state[name], tensor), name


def test_dynamic_length_is_only_used_for_causal_text_towers(tiny):
    assert clip_score.supports_dynamic_text_length(tiny.model)
    assert not clip_score.supports_dynamic_text_length(object())


def test_corrupt_image_is_an_error_for_that_element_only(tiny):
    (_, good), (_, other) = _samples(2)
    batch = [ClipInput(good, "a red circle"), ClipInput(good[: len(good) // 3], "truncated"),
             ClipInput(b"<html>", "not an image"), ClipInput(other, "a blue square")]
    results = OpenClipModelHandler(TINY_CLIP_NAME).run_inference(batch, tiny)
    assert [("error" in r.inference) for r in results] == [False, True, True, False]
    embedding = results[0].inference["image_embedding"]
    assert embedding.dtype == np.float16
    assert abs(float(np.linalg.norm(embedding.astype(np.float32))) - 1.0) < 1e-2


def test_int8_cpu_path_agrees_with_fp32(checkpoint, tiny):
    fast = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision="int8")
    samples = _samples(16, seed=3)
    pairs = [ClipInput(b, a.caption()) for a, b in samples]
    assert np.abs(_scores(fast, pairs) - _scores(tiny, pairs)).max() < 0.05
    assert fast.int8_fidelity > 0.98


def test_model_id():
    assert model_id(CurateConfig()) == "ViT-B-32:laion2b_s34b_b79k"
    assert model_id(_config("/w/tiny_clip.pt")) == "tiny_clip@/w/tiny_clip.pt"


def test_quantile_cutoff():
    quantiles = list(np.linspace(0.0, 1.0, 101))
    assert quantile_cutoff(quantiles, 30) == pytest.approx(0.70)
    assert quantile_cutoff(quantiles, 100) == pytest.approx(0.0)


# ---- Beam ----------------------------------------------------------------------------------------


def _records(samples, captions, corrupt_index=None):
    records = []
    for i, ((_, image), caption) in enumerate(zip(samples, captions)):
        record = {Col.UID: f"u{i:03d}", Col.STATUS: Status.KEPT, Col.CAPTION: caption, Col.CAPTION_CLEAN: caption,
                  Col.IMAGE_BYTES: image}
        if i == corrupt_index:
            record[Col.IMAGE_BYTES] = image[:200]
        records.append(record)
    return records


def test_clip_scoring_transform_scores_drops_corrupt_and_loads_once(checkpoint):
    samples = _samples(12, seed=5)
    captions = [a.caption() for a, _ in samples]
    captions[1] = captions[0] if captions[0] != captions[1] else captions[2]  # one mismatched pair
    records = _records(samples, captions, corrupt_index=4)
    records.append({Col.UID: "u999", Col.STATUS: Status.DROPPED, Col.REASON: DropReason.TOO_SMALL.value})
    config = _config(checkpoint, clip_min_batch_size=4, clip_max_batch_size=5)
    loads_before = clip_score.LOAD_COUNT

    def check_kept(kept):
        assert len(kept) == 11
        by_uid = {r[Col.UID]: r for r in kept}
        for record in kept:
            assert record[Col.IMAGE_BYTES]  # left in place for the write stages
            assert len(record[Col.IMAGE_EMBEDDING]) == len(record[Col.TEXT_EMBEDDING]) == 64
            image = np.asarray(record[Col.IMAGE_EMBEDDING], dtype=np.float32)
            text = np.asarray(record[Col.TEXT_EMBEDDING], dtype=np.float32)
            assert abs(float(image @ text) - record[Col.CLIP_SCORE]) < 5e-3
        matched = [r[Col.CLIP_SCORE] for uid, r in by_uid.items() if uid != "u001"]
        assert by_uid["u001"][Col.CLIP_SCORE] < min(matched)

    def check_dropped(dropped):
        by_uid = {r[Col.UID]: r for r in dropped}
        assert sorted(by_uid) == ["u004", "u999"]
        assert by_uid["u004"][Col.REASON] == DropReason.DECODE_ERROR.value
        assert by_uid["u004"][Col.STATUS] == Status.DROPPED
        assert Col.IMAGE_BYTES not in by_uid["u004"]
        assert by_uid["u999"][Col.REASON] == DropReason.TOO_SMALL.value  # upstream reason stands

    with TestPipeline(runner=FnApiRunner()) as p:
        result = p | beam.Create(records, reshuffle=False) | ClipScoring(config)
        assert_that(result.kept, check_kept, label="kept")
        assert_that(result.dropped, check_dropped, label="dropped")
    # 3 batches (max 5), one process: one load
    assert clip_score.LOAD_COUNT - loads_before == 1


def _features(scores, langs=None):
    langs = langs or ["en"] * len(scores)
    return [{Col.UID: f"{i:032x}", Col.CLIP_SCORE: s, Col.LANG: lang, Col.CAPTION: "a caption"}
            for i, (s, lang) in enumerate(zip(scores, langs))]


def _dropped_uids(features, config_overrides, directory) -> list:
    """The decide phase's per-sample filters (language is off): the uids dropped for their CLIP score."""
    decisions, _ = run_decide(features, directory, negatives_k=0, negatives_captions=False, **config_overrides)
    return sorted(uid for uid, row in decisions.items() if row[Col.REASON] == DropReason.LOW_CLIP_SCORE.value)


def test_filter_absolute_threshold_skips_missing_scores(tmp_path):
    features = _features([0.35, 0.27, 0.28, None, 0.10])
    assert _dropped_uids(features, dict(clip_threshold=0.28), tmp_path) == [f"{1:032x}", f"{4:032x}"]


def test_filter_per_language_thresholds_fall_back_to_default(tmp_path):
    features = _features([0.22, 0.22, 0.22, 0.30], ["en", "de", None, "fr"])
    config = dict(clip_threshold=0.25, clip_thresholds_per_lang={"de": 0.20, "fr": 0.31})
    assert _dropped_uids(features, config, tmp_path) == [f"{i:032x}" for i in (0, 2, 3)]


def test_filter_keep_top_percent_is_global(tmp_path):
    scores = [round(0.01 * i, 2) for i in range(200)]  # 0.00 .. 1.99
    features = _features(scores)
    # global cut at the 75th percentile (~1.49): about 150 of 200 dropped, whatever the files
    expected = {f[Col.UID] for f in features if f[Col.CLIP_SCORE] < 1.4925}
    uids = _dropped_uids(features, dict(clip_keep_top_percent=25.0, clip_threshold=0.0), tmp_path)
    assert abs(len(uids) - 150) <= 2
    assert set(uids) <= expected | {f"{i:032x}" for i in range(148, 152)}


def test_config_fields_exist():
    names = {f.name for f in dataclasses.fields(CurateConfig)}
    assert {"clip_model", "clip_pretrained", "clip_checkpoint", "clip_device", "clip_min_batch_size",
            "clip_max_batch_size", "clip_threshold", "clip_thresholds_per_lang", "clip_keep_top_percent"} <= names


def _shuffles_under(pipeline, prefix: str) -> list[str]:
    """Labels of the GroupByKeys (Reshuffle's included) inside the composite named `prefix`."""
    found = []

    def walk(node):
        if node.full_label.startswith(prefix) and isinstance(node.transform, beam.GroupByKey):
            found.append(node.full_label)
        for part in node.parts:
            walk(part)

    walk(pipeline.transforms_stack[0])
    return found


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_scores_do_not_depend_on_arrival_order_or_bundling(checkpoint, tmp_path, precision):
    """int8: micro-batches are cut in uid order after a shuffle. fp32 (and bf16, fp16): a sample's
    numbers do not depend on its batch, so rows are scored as they come, no shuffle. Either way,
    any arrival order and any batch size give bitwise the same outputs."""
    records = [
        {Col.UID: f"{index:032x}", Col.STATUS: Status.KEPT, Col.CAPTION_CLEAN: attrs.caption(),
         Col.IMAGE_BYTES: synthetic.encode_jpeg(image)}
        for index, (attrs, image) in enumerate(synthetic.iter_samples(11, size=96, seed=3))
    ]

    def score(order, batch_size, out):
        config = CurateConfig(clip_model=TINY_CLIP_NAME, clip_pretrained="", clip_checkpoint=checkpoint,
                              clip_device="cpu", clip_precision=precision, clip_min_batch_size=batch_size,
                              clip_max_batch_size=batch_size)
        scoring = ClipScoring(config, images_inline=True)
        with TestPipeline(runner=FnApiRunner()) as p:
            result = p | beam.Create([dict(records[i]) for i in order]) | beam.Reshuffle() | scoring
            _ = (
                result.kept
                | beam.Map(lambda r: json.dumps([r[Col.UID], r[Col.CLIP_SCORE], Col.IMAGE_BYTES in r,
                                                 np.asarray(r[Col.IMAGE_EMBEDDING]).tobytes().hex(),
                                                 np.asarray(r[Col.TEXT_EMBEDDING]).tobytes().hex()]))
                | beam.io.WriteToText(str(out), shard_name_template="")
            )
        return sorted(out.read_text().splitlines()), _shuffles_under(p, "ClipScoring/")

    forward, shuffles = score(range(11), 4, tmp_path / "forward.jsonl")
    backward, _ = score(list(reversed(range(11))), 4 if precision == "int8" else 7, tmp_path / "backward.jsonl")
    assert len(forward) == 11 and forward == backward
    assert all(json.loads(line)[2] is False for line in forward)  # inline images released once scored
    assert bool(shuffles) == (precision == "int8")


# ---- the CPU fast path: exact rewrites, int8 coverage, parallel pieces, determinism --------------


def _plain_open_clip(checkpoint):
    """open_clip's own model, untouched (nn.MultiheadAttention, full blocks, Conv2d patches)."""
    import open_clip

    plain, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=checkpoint)
    return plain.eval()


def test_text_passes_group_captions_of_one_padded_length(tiny):
    assert clip_score.TEXT_LENGTH_STEP == 4
    assert [clip_score.padded_text_length(n, 77) for n in (1, 4, 5, 17, 73, 76, 77)] == [4, 4, 8, 20, 76, 76, 77]
    captions = ["a cat", "dog", "a red circle on a blue background"] + ["a green star " * 4] * 20 + ["x " * 90]
    tokens = [tiny.tokenize(c) for c in captions]
    groups = tiny._text_groups(tokens, False)
    assert sorted(i for _, part in groups for i in part) == list(range(len(captions)))
    for length, part in groups:
        assert 0 < len(part) <= clip_score.TEXT_CHUNK
        assert {clip_score.padded_text_length(len(tokens[i]), tiny.context_length) for i in part} == {length}
    assert {length for length, _ in tiny._text_groups(tokens, True)} == {tiny.context_length}


def test_inputs_come_out_in_runs_of_one_caption_length(checkpoint):
    """What fills whole text passes: runs of TEXT_CHUNK captions of one padded length, the rest
    at the end of the bundle; every record exactly once, its image loaded."""
    from transforms.clip_score import TEXT_CHUNK, _InputsInRuns

    words = ["cat", "dog", "red", "sun", "car"]
    records = [{Col.UID: f"u{i:03d}", Col.CAPTION_CLEAN: " ".join(words[: 1 + i % 5] * (1 + i % 3)),
                Col.IMAGE_BYTES: b"%d" % i} for i in range(150)]
    runs = _InputsInRuns("", TINY_CLIP_NAME, checkpoint)
    runs.setup()
    runs.start_bundle()
    emitted = [item for record in records for item in runs.process(record)]
    tail = [value.value for value in runs.finish_bundle()]
    runs.teardown()
    def length(record):
        return clip_score._padded_length_of(runs._tokens(record))

    assert len(emitted) % TEXT_CHUNK == 0 and len(emitted) >= 2 * TEXT_CHUNK
    for start in range(0, len(emitted), TEXT_CHUNK):
        assert len({length(record) for record, _ in emitted[start:start + TEXT_CHUNK]}) == 1
    tail_lengths = [length(record) for record, _ in tail]  # the leftovers, grouped by length
    assert tail_lengths == sorted(tail_lengths)
    assert all(tail_lengths.count(n) < TEXT_CHUNK for n in set(tail_lengths))
    out = emitted + tail
    assert sorted(record[Col.UID] for record, _ in out) == [r[Col.UID] for r in records]
    assert all(example.image_bytes == record[Col.IMAGE_BYTES] and example.caption == record[Col.CAPTION_CLEAN]
               for record, example in out)
    # the ids the ordering computed go on with the caption: the model does not tokenise it again
    assert all(np.array_equal(example.tokens, runs._tokens(record)) for record, example in out)


def test_tokens_carried_with_the_input_score_as_the_caption_does(checkpoint, tiny):
    samples = _samples(5, seed=9)
    tokenizer = clip_score.caption_tokenizer(TINY_CLIP_NAME, checkpoint)
    plain = [ClipInput(b, a.caption()) for a, b in samples]
    carried = [ClipInput(b, a.caption(), tokenizer([a.caption()])[0].numpy()) for a, b in samples]
    handler = OpenClipModelHandler(TINY_CLIP_NAME)

    def embeddings(batch):
        return [(r.inference["text_embedding"].tobytes(), r.inference["clip_score"])
                for r in handler.run_inference(batch, tiny)]

    assert embeddings(carried) == embeddings(plain)


def _native_bf16() -> bool:
    return clip_score.cpu_has_native_bf16()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not _native_bf16(), reason="bf16 is only used on CPUs with native bf16"))])
def test_a_samples_embeddings_do_not_depend_on_the_rest_of_its_batch(checkpoint, precision):
    """What lets the pipeline score rows in whatever batches they arrive: bit for bit the same
    embeddings alone, among other samples, at another position, beside a corrupt image."""
    loaded = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision=precision)
    assert loaded.precision == precision and loaded.batch_independent
    samples = _samples(45, seed=31)
    images = [b for _, b in samples]
    tokens = [loaded.tokenize(a.caption() + " photo" * (i % 5)) for i, (a, _) in enumerate(samples)]

    def embed(indices, corrupt=()):
        def load(position):
            data = images[indices[position]]
            return loaded.prepare_image(data[:100] if position in corrupt else data)
        got_images, got_texts, errors = loaded.embed_each(load, len(indices), [tokens[i] for i in indices])
        assert set(errors) == set(corrupt)
        return {index: (None if got_images[position] is None else got_images[position].tobytes(),
                        got_texts[position].tobytes()) for position, index in enumerate(indices)}

    reference = embed(list(range(40)))  # one full and one partial image pass, several caption passes
    assert embed(list(range(39, -1, -1))) == reference  # every sample at another position
    assert embed([3]) == {3: reference[3]}  # alone
    others = embed([44, 17, 41, 5, 42])  # other neighbours
    assert all(others[i] == reference[i] for i in (17, 5))
    beside_corrupt = embed([0, 1, 40, 2], corrupt=(2,))  # sample 40 fails; 0, 1 and 2 do not care
    assert beside_corrupt[40][0] is None
    assert all(beside_corrupt[i] == reference[i] for i in (0, 1, 2))


def test_pooled_token_last_text_block_matches_open_clip_full_length(checkpoint, tiny):
    import torch

    plain = _plain_open_clip(checkpoint)
    captions = ["a red circle on a blue background", "a cat", "a very long and winding caption " * 3, ""]
    tokens = [tiny.tokenize(c) for c in captions]
    with torch.inference_mode():
        reference = plain.encode_text(clip_score.pad_tokens(tokens, tiny.context_length))
        dynamic = clip_score.encode_text_dynamic(tiny.model, clip_score.pad_tokens(tokens))
    assert clip_score._is_plain_sdpa_block(tiny.model.transformer.resblocks[-1])  # the pooled-token path ran
    torch.testing.assert_close(dynamic, reference, atol=1e-5, rtol=1e-4)


def test_text_passes_of_padded_length_match_one_full_length_pass(checkpoint, tiny):
    import torch
    import torch.nn.functional as F

    plain = _plain_open_clip(checkpoint)
    (_, image), = _samples(1)
    captions = ["a cat", "a red circle on a blue background", "a green star " * 8, "dog", "a blue square " * 3]
    images, texts, errors = tiny.embed_each(lambda i: tiny.prepare_image(image), len(captions),
                                            [tiny.tokenize(c) for c in captions])
    assert not errors and len(tiny._text_groups([tiny.tokenize(c) for c in captions], False)) > 1
    with torch.inference_mode():
        full = plain.encode_text(clip_score.pad_tokens([tiny.tokenize(c) for c in captions], tiny.context_length))
    np.testing.assert_allclose(np.stack(texts), F.normalize(full, dim=-1).numpy(), atol=1e-5)


def test_patch_embedding_as_linear_equals_the_conv(checkpoint):
    import torch

    conv = _plain_open_clip(checkpoint).visual.conv1
    assert clip_score.PatchEmbedLinear.fits(conv)
    pixels = torch.randn(3, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(clip_score.PatchEmbedLinear(conv)(pixels), conv(pixels), atol=1e-5, rtol=1e-4)


def test_int8_quantises_attention_projections_and_patch_embedding(checkpoint):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from open_clip.transformer import ResidualAttentionBlock

    fast = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision="int8")
    assert fast.precision == "int8"
    blocks = [m for m in fast.model.modules() if isinstance(m, ResidualAttentionBlock)]
    assert len(blocks) == 6  # 3 image + 3 text blocks
    for block in blocks:
        assert isinstance(block.attn.in_proj, DynamicQuantizedLinear)  # the fused qkv projection
        assert isinstance(block.attn.out_proj, DynamicQuantizedLinear)
        assert isinstance(block.mlp.c_fc, DynamicQuantizedLinear)
    assert isinstance(fast.model.visual.conv1.linear, DynamicQuantizedLinear)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_embeddings_are_bitwise_repeatable_and_independent_of_cpu_threads(checkpoint, precision):
    samples = _samples(40, seed=21)  # > IMAGE_CHUNK: several image pieces and caption passes
    batch = [ClipInput(b, a.caption() + " photo" * (i % 4)) for i, (a, b) in enumerate(samples)]
    handler = OpenClipModelHandler(TINY_CLIP_NAME)

    def run(model):
        return [(r.inference["image_embedding"].tobytes(), r.inference["text_embedding"].tobytes(),
                 r.inference["clip_score"]) for r in handler.run_inference(batch, model)]

    one = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision=precision, cpu_threads=1)
    two = load_open_clip(TINY_CLIP_NAME, checkpoint_path=checkpoint, device="cpu", precision=precision, cpu_threads=3)
    assert one.workers.count == 1 and two.workers.count == 3
    first = run(two)
    assert run(two) == first  # the same micro-batch, the same bytes
    assert run(one) == first  # whatever the thread count


def test_cpu_workers_run_single_threaded_and_leave_the_caller_alone():
    import torch

    before = torch.get_num_threads()
    workers = clip_score.CpuWorkers(2)
    assert workers.run([torch.get_num_threads] * 4) == [1, 1, 1, 1]
    assert torch.get_num_threads() == before


def test_jpeg_draft_decode_only_for_big_images_and_close_to_a_full_decode(tiny):
    (_, image), = synthetic.iter_samples(1, size=256, seed=4)
    big = synthetic.encode_jpeg(image.resize((1600, 1200)), quality=90)
    side = clip_score.draft_side_for(tiny.pil_preprocess)
    assert side == clip_score.DRAFT_MIN_SIDE  # twice the tiny model's target (48) is less: the floor
    assert clip_score.decode_image(big, side).size == (800, 600)  # the decoder's 1/2 scale: still >= 512
    assert clip_score.decode_image(big).size == (1600, 1200)
    assert clip_score.decode_image(synthetic.encode_jpeg(image.resize((900, 900))), side).size == (900, 900)
    png = io.BytesIO()
    image.resize((1600, 1200)).save(png, format="PNG")
    assert clip_score.decode_image(png.getvalue(), side).size == (1600, 1200)  # JPEG only
    drafted = tiny.prepare_image(big)
    full = np.asarray(tiny.pil_preprocess(clip_score.decode_image(big)), dtype=np.uint8)
    assert drafted.shape == full.shape
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 1.0


def test_config_cpu_threads_reaches_the_handler_and_never_reruns_fetch(checkpoint):
    from pipeline.config import phase_of_key

    handler = clip_score.handler_from_config(_config(checkpoint, clip_cpu_threads=3))
    assert handler.cpu_threads == 3
    assert phase_of_key("clip_cpu_threads") == ""  # outputs do not depend on it (test above)


def test_attention_swap_keeps_the_device_and_dtype_of_the_weights(checkpoint):
    import torch

    plain = _plain_open_clip(checkpoint).to(torch.float16)  # as a CUDA fp16 load has it
    assert clip_score.use_sdpa_attention(plain) == 6
    for module in plain.modules():
        if isinstance(module, clip_score.SdpaAttention):
            assert module.in_proj.weight.dtype == module.out_proj.weight.dtype == torch.float16
