"""Train the tiny open_clip model the tests and the demo use instead of real CLIP weights.

Real runs score with real weights (ViT-B-32 `laion2b_s34b_b79k` from the open_clip hub, or a local
checkpoint). Nothing can be downloaded where the tests run, so the project trains its own tiny
model of the same architecture family (open_clip `CLIP`: ViT image tower, causal text transformer,
OpenAI BPE tokenizer) on the synthetic shapes x colours x backgrounds set, and ships the result:

    pipeline/assets/tiny_clip.pt    fp16 state dict (~7 MB), loadable by open_clip's own loader
    pipeline/assets/tiny_clip.json  the open_clip model config; its file stem is the model name

Reproduce with `python -m pipeline.tiny_clip --out pipeline/assets/tiny_clip.pt` (about a minute on
2 CPU cores). Training is seeded and runs a fixed number of steps, so the same machine and torch
version give the same weights; `--seconds` only caps the wall time for slow machines.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline import synthetic

TINY_CLIP_NAME = "tiny_clip"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS_DIR / f"{TINY_CLIP_NAME}.pt"

# Same family as ViT-B-32, scaled down. The text tower keeps the OpenAI tokenizer (vocab 49408,
# context 77) so the real tokenizer and the dynamic-length path are exercised; a 64-wide token
# table keeps the fp16 checkpoint under 10 MB.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}

DEFAULT_STEPS = 150
BATCH = 120  # half of the 240 attribute combinations: no two samples in a batch share a caption
TRAIN_SEED = 1
HELD_OUT_SEED = 2  # different render seeds: new positions, sizes, colour jitter and noise


def config_path_for(checkpoint: os.PathLike | str) -> Path:
    """The open_clip model config shipped beside a checkpoint: same stem, `.json`."""
    return Path(checkpoint).with_suffix(".json")


def register_config(checkpoint: os.PathLike | str) -> Optional[str]:
    """Register the sidecar config with open_clip; returns the model name it defines (or None)."""
    from transforms.clip_score import register_sidecar_config

    return register_sidecar_config(str(checkpoint))


def _render_pool(count: int, seed: int, preprocess) -> tuple[list, "object"]:
    """Samples rendered the way the pipeline sees them: a 128px JPEG, decoded, then preprocessed."""
    import torch
    from PIL import Image

    attrs, pixels = [], []
    for attributes, image in synthetic.iter_samples(count, size=128, seed=seed):
        decoded = Image.open(io.BytesIO(synthetic.encode_jpeg(image))).convert("RGB")
        attrs.append(attributes)
        pixels.append(preprocess(decoded))
    return attrs, torch.stack(pixels)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def evaluate(model, tokenizer, attrs: list, pixels) -> dict:
    """Matching vs swapped-caption cosine on a held-out set, plus caption retrieval accuracy."""
    import torch

    combos = synthetic.all_attributes()
    index = {a: i for i, a in enumerate(combos)}
    with torch.inference_mode():
        text = model.encode_text(tokenizer([a.caption() for a in combos]), normalize=True)
        image = model.encode_image(pixels, normalize=True)
    sims = image @ text.T  # [samples, combos]
    target = torch.tensor([index[a] for a in attrs])
    match = sims[torch.arange(len(attrs)), target]
    # "swapped": the caption of another held-out sample (what a shuffled alt-text looks like)
    other = torch.tensor([index[a] for a in attrs[1:] + attrs[:1]])
    differs = other != target
    swapped = sims[torch.arange(len(attrs)), other][differs]
    # "one word off": same shape and background, another colour (the hardest mismatch)
    colours = list(synthetic.COLOURS)
    near = torch.tensor(
        [
            index[synthetic.Attributes(a.shape, colours[(colours.index(a.colour) + 1) % len(colours)], a.background)]
            for a in attrs
        ]
    )
    near_sim = sims[torch.arange(len(attrs)), near]
    return {
        "held_out_samples": len(attrs),
        "match_mean": round(float(match.mean()), 4),
        "match_min": round(float(match.min()), 4),
        "swapped_mean": round(float(swapped.mean()), 4),
        "swapped_max": round(float(swapped.max()), 4),
        "separation": round(float(match.mean() - swapped.mean()), 4),
        "pairwise_accuracy": round(float((match[differs] > swapped).float().mean()), 4),
        "colour_swap_mean": round(float(near_sim.mean()), 4),
        "colour_swap_accuracy": round(float((match > near_sim).float().mean()), 4),
        "retrieval_top1": round(float((sims.argmax(dim=1) == target).float().mean()), 4),
    }


def train(out: os.PathLike | str, steps: int = DEFAULT_STEPS, seconds: Optional[float] = None, seed: int = TRAIN_SEED) -> dict:
    """Train, save the fp16 checkpoint and its config JSON at `out`; returns the held-out report."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from transforms.clip_score import encode_text_dynamic, pad_tokens, trim_tokens

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = config_path_for(out)
    config_file.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    open_clip.add_model_config(config_file)
    name = config_file.stem

    started = time.perf_counter()
    _seed_everything(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    combos = synthetic.all_attributes()
    per_block = len(combos)
    train_attrs, train_pixels = _render_pool(per_block * 8, TRAIN_SEED, preprocess)
    held_attrs, held_pixels = _render_pool(per_block, HELD_OUT_SEED, preprocess)
    caption_tokens = pad_tokens([trim_tokens(t) for t in tokenizer([a.caption() for a in combos]).numpy()])
    combo_index = {a: i for i, a in enumerate(combos)}
    train_targets = torch.tensor([combo_index[a] for a in train_attrs])
    data_seconds = time.perf_counter() - started

    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    for step in range(steps):
        # iter_samples yields each block of 240 as a permutation of all combinations, so the first
        # half of a shuffled block has distinct captions: no false negatives in the contrastive loss
        block = int(torch.randint(0, len(train_attrs) // per_block, (1,), generator=generator))
        rows = block * per_block + torch.randperm(per_block, generator=generator)[:BATCH]
        image_features = F.normalize(model.encode_image(train_pixels[rows]), dim=-1)
        # causal text tower: padding to the batch's longest caption is exact and ~7x cheaper than 77
        text_features = F.normalize(encode_text_dynamic(model, caption_tokens[train_targets[rows]]), dim=-1)
        logit_scale = model.logit_scale.exp()
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % 25 == 0:
            print(f"step {done}/{steps} loss {float(loss.detach()):.4f} {time.perf_counter() - started:.0f}s", flush=True)
        if seconds is not None and time.perf_counter() - started > seconds:
            break
    model.eval()
    train_seconds = time.perf_counter() - started

    # fp16 halves the file; open_clip's loader copies it back into the fp32 model
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, out)
    report = evaluate(model, tokenizer, held_attrs, held_pixels)
    report.update(
        {
            "checkpoint": str(out),
            "checkpoint_bytes": out.stat().st_size,
            "steps": done,
            "data_seconds": round(data_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "final_loss": round(float(loss.detach()), 4),
        }
    )
    return report


def ensure_tiny_clip(path: Optional[os.PathLike | str] = None) -> str:
    """Path of the tiny checkpoint (the shipped one by default), training it first if it is missing.

    Also registers its config with open_clip, so `TINY_CLIP_NAME` works as a model name.
    """
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not (path.is_file() and config_path_for(path).is_file()):
        train(path)
    register_config(path)
    return str(path)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_CHECKPOINT), help="checkpoint path (.pt); the config goes beside it")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seconds", type=float, default=None, help="wall-time cap (breaks exact reproducibility)")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    args = parser.parse_args(argv)
    report = train(args.out, steps=args.steps, seconds=args.seconds, seed=args.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
