"""CLIP scoring throughput: a naive open_clip loop vs ours through Beam RunInference.

Same images (256px JPEGs from pipeline/synthetic.py), same captions, same ViT-B-32 weights (random
init: speed does not depend on the values; nothing can be downloaded here), in one process:

- naive: what clip-retrieval's inference does: PIL preprocess per image, fp32, every caption padded
  to 77 tokens, batches of 64, `encode_image` + `encode_text`.
- ours:  the pipeline's `ClipScoring` stage (uid-ordered micro-batches into `RunInference` with
         `OpenClipModelHandler`) on the FnApiRunner:
  batches of `--batch` cut in uid order, captions padded to the batch's longest, and the device's fast path
  (CPU: int8 dynamic quantisation unless bf16 is native; CUDA: fp16).

Prints pairs/s for both, the ratio, and fidelity: mean cosine of our image and text embeddings
against the naive fp32 full-length ones (float16 storage included).

    python benchmarks/clip_throughput.py [--pairs 1024] [--batch 64] [--precision auto] [--work]

`--work` adds the work per pair with no parallelism at all (CPU seconds, torch on one thread, one
CPU inference thread for ours, no Beam): on a machine whose cores other processes share, OpenMP
threads spin while they wait for each other and inflate the naive loop's CPU time and wall time,
so this is the steadier measure of what each pair costs.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import synthetic  # noqa: E402
from transforms import clip_score  # noqa: E402
from pipeline.config import CurateConfig  # noqa: E402
from schemas import Col, Status  # noqa: E402
from transforms.clip_score import ClipInput, ClipScoring  # noqa: E402

MODEL = "ViT-B-32"
CHECKPOINT = "/tmp/clip_bench_vit_b_32_random.pt"


def make_pairs(count: int) -> list[ClipInput]:
    # web-like alt text lengths: the synthetic caption plus a varying tail (9 to ~30 tokens)
    tails = ["", " photo", " high quality stock photo", " clip art for a school poster, free download",
             " in flat vector style, isolated, minimal icon design for web and print use"]
    return [
        ClipInput(synthetic.encode_jpeg(image.resize((256, 256)), quality=90), attrs.caption() + tails[i % len(tails)])
        for i, (attrs, image) in enumerate(synthetic.iter_samples(count, size=256, seed=42))
    ]


def naive(model, preprocess, tokenizer, pairs: list[ClipInput], batch: int):
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(p.image_bytes)).convert("RGB")) for p in chunk])
            tokens = tokenizer([p.caption for p in chunk])  # always 77
            images.append(F.normalize(model.encode_image(pixels), dim=-1))
            texts.append(F.normalize(model.encode_text(tokens), dim=-1))
    return torch.cat(images).numpy(), torch.cat(texts).numpy()


def _save(records, path):
    records = sorted(records, key=lambda record: record[Col.UID])
    np.savez(
        path,
        image=np.stack([np.asarray(r[Col.IMAGE_EMBEDDING]) for r in records]).astype(np.float32),
        text=np.stack([np.asarray(r[Col.TEXT_EMBEDDING]) for r in records]).astype(np.float32),
    )


def _records_from(path: str):
    with open(path, "rb") as handle:
        pairs = pickle.load(handle)
    for index, pair in enumerate(pairs):
        yield {Col.UID: f"{index:08d}", Col.STATUS: Status.KEPT, Col.IMAGE_BYTES: pair.image_bytes,
               Col.CAPTION_CLEAN: pair.caption}


def ours(pairs: list[ClipInput], batch: int, precision: str):
    """The pipeline's own stage: ClipScoring (uid-ordered micro-batches of `batch` into RunInference)."""
    config = CurateConfig(clip_model=MODEL, clip_pretrained="", clip_checkpoint=CHECKPOINT, clip_device="auto",
                          clip_precision=precision, clip_max_batch_size=batch)
    # The pairs reach the pipeline through a file, as images reach the stage in a run (raw tars):
    # beam.Create would pickle and bz2-compress every image into the pipeline graph first, ~1.5 s
    # per 1,000 pairs that is no part of scoring.
    source = CHECKPOINT + ".pairs.pkl"
    with open(source, "wb") as handle:
        pickle.dump(pairs, handle)
    out = CHECKPOINT + ".ours.npz"  # the runner pickles DoFns: results come back through a file
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (
            p
            | beam.Create([source], reshuffle=False)
            | beam.FlatMap(_records_from)
            | ClipScoring(config)
        ).kept | beam.combiners.ToList() | beam.Map(_save, out)
    saved = np.load(out)
    return saved["image"], saved["text"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=clip_score.PRECISIONS)
    parser.add_argument("--work", action="store_true", help="also measure single-threaded work per pair")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    torch.save(model.state_dict(), CHECKPOINT)  # ours loads the same weights through the real path
    tokenizer = open_clip.get_tokenizer(MODEL)
    pairs = make_pairs(args.pairs)
    device = clip_score.select_device("auto")
    print(f"device: {device} ({torch.get_num_threads()} threads, torch {torch.__version__}); "
          f"precision: {clip_score.resolve_precision(args.precision, device)}; pairs: {len(pairs)}; batch: {args.batch}")

    naive(model, preprocess, tokenizer, pairs[: args.batch // 4], args.batch)  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    ref_image, ref_text = naive(model, preprocess, tokenizer, pairs, args.batch)
    naive_seconds = time.perf_counter() - started
    naive_cpu = time.process_time() - cpu_started
    print(f"naive open_clip loop (fp32, 77 tokens, batch {args.batch}): {len(pairs) / naive_seconds:.2f} pairs/s "
          f"({naive_seconds:.1f} s)", flush=True)
    del model

    # the model load (and the int8 probe) happens inside the run: counted against ours
    started, cpu_started = time.perf_counter(), time.process_time()
    got_image, got_text = ours(pairs, args.batch, args.precision)
    ours_seconds = time.perf_counter() - started
    ours_cpu = time.process_time() - cpu_started

    load_seconds = clip_score.LAST_LOAD_SECONDS
    naive_rate = len(pairs) / naive_seconds
    ours_rate = len(pairs) / (ours_seconds - load_seconds)  # like the naive loop: model already loaded
    ours_rate_with_load = len(pairs) / ours_seconds
    image_fidelity = float((ref_image * got_image).sum(1).mean())
    text_fidelity = float((ref_text * got_text).sum(1).mean())
    score_error = float(np.abs((ref_image * ref_text).sum(1) - (got_image * got_text).sum(1)).max())
    print(f"ours via RunInference: {ours_rate:.2f} pairs/s ({ours_seconds - load_seconds:.1f} s after a "
          f"{load_seconds:.1f} s model load; {ours_rate_with_load:.2f} pairs/s counting the load)")
    print(f"ratio: {ours_rate / naive_rate:.2f}x ({ours_rate_with_load / naive_rate:.2f}x counting the load)")
    # other processes share this machine's cores: CPU seconds of this process are the steadier measure
    ours_cpu -= clip_score.LAST_LOAD_CPU_SECONDS
    print(f"CPU seconds per pair: naive {naive_cpu / len(pairs):.3f}, ours {ours_cpu / len(pairs):.3f} "
          f"(after the load); CPU-time ratio {naive_cpu / ours_cpu:.2f}x; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes share them)")
    print(f"fidelity: mean cosine vs fp32 full-length: image {image_fidelity:.4f}, text {text_fidelity:.4f}, "
          f"both {(image_fidelity + text_fidelity) / 2:.4f}; max |clip_score diff| {score_error:.4f}")
    if args.work:
        single_threaded_work(pairs, args.batch, args.precision)


def single_threaded_work(pairs: list[ClipInput], batch: int, precision: str) -> None:
    """CPU seconds per pair of the naive loop and of our handler, both on one thread, no Beam."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=CHECKPOINT)
        model.eval()
        tokenizer = open_clip.get_tokenizer(MODEL)
        loaded = clip_score.load_open_clip(MODEL, checkpoint_path=CHECKPOINT, device="cpu", precision=precision,
                                           cpu_threads=1)
        handler = clip_score.OpenClipModelHandler(MODEL)
        chunks = [pairs[start:start + batch] for start in range(0, len(pairs), batch)]
        handler.run_inference(chunks[0][: batch // 4], loaded)  # warm-up
        cpu_started = time.process_time()
        naive(model, preprocess, tokenizer, pairs, batch)
        naive_cpu = time.process_time() - cpu_started
        cpu_started = time.process_time()
        for chunk in chunks:
            handler.run_inference(chunk, loaded)
        ours_cpu = time.process_time() - cpu_started
    finally:
        torch.set_num_threads(threads)
    print(f"single-threaded work per pair (CPU seconds, no Beam): naive {naive_cpu / len(pairs):.3f}, "
          f"ours {ours_cpu / len(pairs):.3f}; work ratio {naive_cpu / ours_cpu:.2f}x")


if __name__ == "__main__":
    main()
