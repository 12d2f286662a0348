"""CLIP scoring (fetch phase): image and caption embeddings plus their cosine. The filter that
decides from these scores in the decide phase is `transforms.clip_filter` (no torch).

Fetch phase: `ClipScoring` runs Beam's RunInference with `OpenClipModelHandler`, so the open_clip
model loads once per worker process (RunInference keeps it in a per-process `Shared` handle that
all the process's threads use), never at pickling time and never per element. Each element is
decoded and preprocessed on its own inside the handler before its images are stacked, so a corrupt
image costs that row (DECODE_ERROR on `.dropped`), never its batch.

Speed. Exact (same numbers up to float rounding):
- text is padded to the next multiple of 4 tokens (`padded_text_length`), not to the context
  length (77), and captions of the same padded length share a pass. For a causal text tower
  (OpenAI-style CLIP: causal mask, EOT/argmax pooling) no token attends to the padding after it,
  so the embedding is the same; other text towers keep full-length padding.
- a ViT pooled by its class token runs its last block for that token only; a causal text tower
  runs its last block for the pooled (EOT) token only.
- attention through `scaled_dot_product_attention` (`SdpaAttention`, same weights).
- on CPU, a batch is cut into pieces (image chunks, caption sub-batches) that the process's
  `CpuWorkers` run in parallel, each single-threaded in torch, JPEG decoding inside the image
  pieces: no OpenMP barrier per op (costly on small shared machines), decoding overlaps the
  model, and the numbers do not depend on the thread count. Big JPEGs are decoded at a reduced
  scale (PIL draft mode) down to twice the resize target at the least, then resized as open_clip
  does.
- `torch.inference_mode`; channels_last for convolutional towers; on CPU, freed activation memory
  stays in the heap instead of being page-faulted back every batch.
Determinism: every forward pass has a fixed shape (IMAGE_CHUNK images, or TEXT_CHUNK captions at
one padded length, blank rows filling a pass), so in fp32, bf16 and fp16 a sample's embedding is a
function of the sample alone, whatever else its batch holds. `ClipScoring` then scores rows where
they are produced, no shuffle. int8 quantises activations with one scale per call, which mixes the
rows of a pass: deterministic int8 runs cut micro-batches by uid after a shuffle instead.
Approximate, chosen per device (`precision="auto"`): fp16 on CUDA; bf16 autocast on CPUs with
native bf16 (AVX512-BF16 / AMX); elsewhere on CPU int8 dynamic quantisation of the Linear layers
(attention qkv and output projections and a ViT's patch embedding included; the image tower's
weights packed for oneDNN, the text tower's for FBGEMM), used only if at load time it agrees with
fp32 on a probe batch (mean cosine >= `INT8_MIN_FIDELITY`), else fp32. `precision="fp32"` turns
the approximate part off.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import zlib
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.heap import keep_freed_memory
from schemas import Col, DropReason
from transforms.base import DROPPED, KEPT, caption_of, is_dropped, mark_dropped
from transforms.clip_filter import check_checkpoint_file
from transforms.write_output import RawImageReader, ReadsRawImages

log = logging.getLogger(__name__)

METRICS_NAMESPACE = "clip_score"
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
INT8_MIN_FIDELITY = 0.995
EMBEDDING_DTYPE = np.float16  # the features table stores list<float16>
# Forward-pass shapes (see LoadedClip.embed_each). Every pass has a fixed shape: IMAGE_CHUNK images
# or TEXT_CHUNK captions (padded with blank rows), captions padded to a rung of the length ladder.
# The same shape runs the same kernels, and rows never mix inside a pass, so a sample's numbers do
# not depend on which samples share its batch (fp32, bf16, fp16; not int8, whose activation scale
# is per call). Constants, so that no shape ever depends on the machine.
IMAGE_CHUNK = 32  # images per forward pass on CPU
ACCELERATOR_IMAGE_CHUNK = 64  # images per forward pass on an accelerator (bigger passes pay there)
TEXT_CHUNK = 32  # captions per forward pass
TEXT_LENGTH_STEP = 4  # caption lengths (tokens) are padded up to a multiple of this (the context at most)
BATCH_INDEPENDENT_PRECISIONS = ("fp32", "fp16", "bf16")

# Counts model loads in this process: the tests use it to prove one load per process.
LOAD_COUNT = 0
LAST_LOAD_SECONDS = 0.0  # the benchmark separates load time from steady-state throughput
LAST_LOAD_CPU_SECONDS = 0.0
_LOAD_LOCK = threading.Lock()
_ENGINE_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------
# pure helpers (no Beam)
# ------------------------------------------------------------------------------------------------


def select_device(requested: str = "auto") -> str:

    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"clip device must be auto, cpu or cuda, got {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def cpu_has_native_bf16() -> bool:
    """bf16 only pays on CPUs that compute it natively; elsewhere oneDNN emulates it, slower than fp32."""

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"clip precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "int8"


def supports_dynamic_text_length(model) -> bool:
    """True for open_clip `CLIP` text towers whose pooled token never sees the padding after it."""
    import open_clip

    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None  # causal mask
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
    )


def trim_tokens(tokens: np.ndarray) -> np.ndarray:
    """Drop the trailing pad ids (0) after EOT; a caption always ends in EOT, so real tokens stay."""
    nonzero = np.flatnonzero(tokens)
    return tokens[: int(nonzero[-1]) + 1] if nonzero.size else tokens[:1]


def pad_tokens(sequences: Sequence[np.ndarray], length: Optional[int] = None):
    """Stack token id sequences into a [batch, length] tensor, zero padded (the tokenizer's pad id)."""

    length = length or max(len(s) for s in sequences)
    batch = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.as_tensor(sequence[:length], dtype=torch.long)
    return batch


def text_pool_index(model, tokens) -> Optional[torch.Tensor]:
    """Per row, the position of the token the text tower pools (the same rule as open_clip's
    `text_global_pool`), or None for pooling over other things than one token."""
    pool_type = getattr(model, "text_pool_type", None)
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    if pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return None


def _pooled_token_last_block(block, x, index):
    """The last causal text block for the pooled token of each row only: one query attending to
    the keys at or before it (what the causal mask lets it see); the other tokens' outputs are
    never read. Returns [batch, width]."""
    rows = torch.arange(x.shape[0], device=x.device)
    normed = block.ln_1(x)
    query = normed[rows, index].unsqueeze(1)
    visible = torch.arange(x.shape[1], device=x.device)[None, :] <= index[:, None]  # [batch, L]
    attended = block.attn(query, normed, normed, need_weights=False, attn_mask=visible[:, None, None, :])[0]
    h = x[rows, index].unsqueeze(1) + block.ls_1(attended)
    h = h + block.ls_2(block.mlp(block.ln_2(h)))
    return h[:, 0]


def encode_text_dynamic(model, tokens):
    """open_clip `CLIP.encode_text` for a [batch, L] token tensor with L <= context length.

    Same computation as open_clip's, except the positional embedding and the causal mask are cut
    to L instead of always spanning the full context, and, where the last block's attention is an
    `SdpaAttention`, that block runs for the pooled token only (the final LayerNorm is per token,
    so it commutes with the pooling).
    """
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length].to(cast_dtype)
    blocks = model.transformer.resblocks
    index = text_pool_index(model, tokens)
    if index is not None and model.transformer.batch_first and _is_plain_sdpa_block(blocks[-1]):
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        x = model.ln_final(_pooled_token_last_block(blocks[-1], x, index))
    else:
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


def padded_text_length(length: int, context_length: int) -> int:
    """The length a caption of `length` tokens is padded to: the next rung of the ladder."""
    return min(-(-length // TEXT_LENGTH_STEP) * TEXT_LENGTH_STEP, context_length)


def split_preprocess(preprocess):
    """Split open_clip's eval transform into its PIL part and its (ToTensor, Normalize) tail.

    The PIL part runs per element and yields a small uint8 array; the tail runs once per batch as
    tensor ops. `ToTensor` on uint8 is `/255`, so the result is the same as the full transform.
    Returns (pil_fn, mean, std), or (preprocess, None, None) if the transform has another shape.
    """
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    to_tensor = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if to_tensor is None or to_tensor + 2 != len(steps) or not isinstance(steps[-1], T.Normalize):
        return preprocess, None, None
    normalize = steps[-1]
    return T.Compose(steps[:to_tensor]), tuple(normalize.mean), tuple(normalize.std)


def decode_image(image_bytes: bytes, draft_side: int = 0):
    """Decode fully (a truncated JPEG fails here, not later) and convert to RGB.

    `draft_side`: a JPEG whose shorter side is at least twice this is decoded at 1/2, 1/4 or 1/8
    scale by the JPEG decoder itself (PIL's draft mode; much less work than a full decode), to a
    shorter side still >= `draft_side`; the caller's resize then does the rest.
    """
    from PIL import Image

    if not image_bytes:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(image_bytes)) as image:
        if draft_side and image.format == "JPEG" and min(image.size) >= 2 * draft_side:
            image.draft(None, (draft_side, draft_side))
        image.load()
        return image.convert("RGB")


DRAFT_MIN_SIDE = 512  # smaller images decode in ~1 ms anyway: never drafted, scored exactly as before


def draft_side_for(pil_preprocess) -> int:
    """The smallest shorter side an image may be JPEG-draft-decoded to before open_clip's resize:
    twice the resize target (so the bicubic resize still downsamples and antialiases the last
    factor >= 2 itself), and at least DRAFT_MIN_SIDE. 0 (no draft) for transforms of another shape."""
    from torchvision import transforms as T

    steps = list(getattr(pil_preprocess, "transforms", []))
    if not steps or not isinstance(steps[0], T.Resize):
        return 0
    size = steps[0].size
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    return max(2 * size, DRAFT_MIN_SIDE) if isinstance(size, int) else 0


class ClipInput(NamedTuple):
    """One element for the handler: encoded image bytes and the caption to score against it;
    `tokens`, the caption's ids from the model's tokenizer when the caller has them already."""

    image_bytes: bytes
    caption: str
    tokens: Optional[np.ndarray] = None


# ------------------------------------------------------------------------------------------------
# the loaded model (one per worker process)
# ------------------------------------------------------------------------------------------------


class ClipBatch(NamedTuple):
    """A micro-batch formed upstream in uid order: scored as one forward pass, never re-mixed.

    Scores depend (in the last bits for fp32, up to ~1e-2 for int8's per-batch activation scale)
    on which samples share a forward pass, so batch composition must be a function of the data,
    not of bundles, timing or the number of workers, for runs to give byte-identical outputs.
    """

    examples: tuple


class SdpaAttention(nn.Module):
    """nn.MultiheadAttention's maths (self-attention, batch first) with nn.Linear projections, so
    int8 can quantise the fused qkv projection too (quantize_dynamic skips MultiheadAttention's
    `in_proj_weight`, a bare Parameter), and with masks that broadcast per row ([batch, 1, 1, L])."""

    def __init__(self, source: nn.MultiheadAttention):
        super().__init__()
        dim = source.embed_dim
        self.num_heads = source.num_heads
        like = dict(device=source.in_proj_weight.device, dtype=source.in_proj_weight.dtype)  # e.g. CUDA fp16
        self.in_proj = nn.Linear(dim, 3 * dim, bias=source.in_proj_bias is not None, **like)
        self.in_proj.weight.data.copy_(source.in_proj_weight.data)
        if source.in_proj_bias is not None:
            self.in_proj.bias.data.copy_(source.in_proj_bias.data)
        self.out_proj = nn.Linear(dim, dim, bias=source.out_proj.bias is not None, **like)
        self.out_proj.weight.data.copy_(source.out_proj.weight.data)
        if source.out_proj.bias is not None:
            self.out_proj.bias.data.copy_(source.out_proj.bias.data)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        batch, length, dim = query.shape
        heads = self.num_heads
        if key is None or key is query:  # self-attention: one fused projection
            qkv = self.in_proj(query).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:  # fewer queries than keys (a pooled-token-only last block); key is value here
            kv = self.in_proj(key).view(batch, key.shape[1], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            k, v = kv[1], kv[2]
            q = self.in_proj(query)[..., :dim].view(batch, length, heads, dim // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), None


def use_sdpa_attention(model) -> int:
    """Swap every self-attention nn.MultiheadAttention of open_clip's residual blocks for an
    SdpaAttention (same weights, same maths up to float rounding). Returns how many it swapped."""
    from open_clip.transformer import ResidualAttentionBlock

    swapped = 0
    for module in model.modules():
        if (
            isinstance(module, ResidualAttentionBlock)
            and isinstance(module.attn, nn.MultiheadAttention)
            and module.attn.batch_first
            and module.attn._qkv_same_embed_dim
            and not hasattr(module, "ln_1_kv")  # self-attention only
        ):
            module.attn = SdpaAttention(module.attn)
            swapped += 1
    return swapped


def _is_plain_sdpa_block(block) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    return (
        type(block) is ResidualAttentionBlock
        and isinstance(block.attn, SdpaAttention)
        and not hasattr(block, "ln_1_kv")
    )


class PatchEmbedLinear(nn.Module):
    """A ViT's patch embedding (a Conv2d whose stride is its kernel, no padding) as one Linear over
    the flattened patches: the same maths, a plain GEMM that int8 can quantise like the others."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size
        self.linear = nn.Linear(conv.in_channels * self.patch[0] * self.patch[1], conv.out_channels,
                                bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.linear.weight.data.copy_(conv.weight.data.reshape(conv.out_channels, -1))
        if conv.bias is not None:
            self.linear.bias.data.copy_(conv.bias.data)

    @staticmethod
    def fits(conv) -> bool:
        return (
            isinstance(conv, nn.Conv2d)
            and conv.stride == conv.kernel_size
            and conv.padding in ((0, 0), 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x):
        batch, channels, height, width = x.shape
        ph, pw = self.patch
        gh, gw = height // ph, width // pw
        x = x[:, :, : gh * ph, : gw * pw]  # a strided conv ignores the remainder too
        patches = x.reshape(batch, channels, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(batch, gh * gw, -1)
        return self.linear(patches).transpose(1, 2).reshape(batch, -1, gh, gw)


class ClassTokenOnlyBlock(nn.Module):
    """The last block of a ViT pooled by its class token: only that token's output is ever read,
    so compute attention for one query and the MLP for one token (same numbers, ~1/12 less work)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        block = self.block
        normed = block.ln_1(q_x)
        x = q_x[:, :1] + block.ls_1(block.attn(normed[:, :1], normed, normed, need_weights=False)[0])
        return x + block.ls_2(block.mlp(block.ln_2(x)))


def prune_class_token_last_block(model) -> bool:
    """Swap in ClassTokenOnlyBlock where it is exact: plain ViT, class-token pooling, no token outputs."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    if not (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.output_tokens
        and visual.transformer.batch_first
        and isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock)
        and not hasattr(visual.transformer.resblocks[-1], "ln_1_kv")
    ):
        return False
    visual.transformer.resblocks[-1] = ClassTokenOnlyBlock(visual.transformer.resblocks[-1])
    return True


def vision_int8_engine() -> Optional[str]:
    """The quantised engine that packs the image tower's int8 weights (the engine is chosen at
    packing time; the packed weights then run with it). oneDNN when torch has it: on the AVX2 EPYC
    here its single-threaded int8 GEMMs ran the ViT's shapes (hundreds of tokens x 768..3072)
    5-35% faster than FBGEMM's, the ViT-B-32 image tower ~7% faster. The text tower keeps torch's
    default (FBGEMM): as fast for its mid-size sub-batches, faster for small ones. A fixed choice,
    never timed at load: the engines round differently, and outputs must not depend on timing."""
    return "onednn" if "onednn" in torch.backends.quantized.supported_engines else None


@contextlib.contextmanager
def quantized_engine(name: Optional[str]):
    with _ENGINE_LOCK:  # a process-wide setting: one switch at a time
        previous = torch.backends.quantized.engine
        if name:
            torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def _quantize_int8(model):
    """int8 dynamic quantisation of every Linear (weights int8 per tensor, activations quantised
    per call): attention qkv and output projections (through SdpaAttention), MLPs, and a ViT's
    patch embedding (through PatchEmbedLinear). The final projections are bare matrices: fp32."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    use_sdpa_attention(model)
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and PatchEmbedLinear.fits(visual.conv1):
        visual.conv1 = PatchEmbedLinear(visual.conv1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks eager quantisation deprecated; it still ships
        if isinstance(visual, nn.Module):
            with quantized_engine(vision_int8_engine()):
                torch.ao.quantization.quantize_dynamic(visual, {nn.Linear}, dtype=torch.qint8, inplace=True)
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock):
            # open_clip reads its cast dtype from this weight; the hook it offers for int8 layers
            module.mlp.c_fc.int8_original_dtype = torch.float32
    return model


class CpuWorkers:
    """The process's CPU inference threads: each runs its torch ops on ONE intra-op thread, and the
    work of a batch is cut into independent pieces (image chunks, caption buckets) that they take
    in parallel. On a small shared machine this keeps every core busy without OpenMP's barriers
    (one late thread stalls every op of a multi-threaded call), and it makes the numbers
    independent of the core count: a piece always runs single-threaded, whatever `count` is."""

    _shared: dict = {}
    _lock = threading.Lock()

    def __init__(self, count: int):
        from concurrent.futures import ThreadPoolExecutor

        self.count = count
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="clip-cpu")
        previous = torch.get_num_threads()
        barrier = threading.Barrier(count)

        def pin(_):
            torch.set_num_threads(1)
            barrier.wait(timeout=120)  # each of the `count` threads pins itself exactly once
            return torch.get_num_threads()

        if list(self._pool.map(pin, range(count))) != [1] * count:
            raise RuntimeError("CPU inference threads could not be set to one torch thread each")
        # torch.set_num_threads is per thread for OpenMP and MKL, but also sets the default that
        # threads started later take: give the rest of the process its own setting back
        torch.set_num_threads(previous)

    @classmethod
    def shared(cls, count: int) -> "CpuWorkers":
        import os

        key = (os.getpid(), count)  # a forked child has none of its parent's threads
        with cls._lock:
            if key not in cls._shared:
                cls._shared[key] = cls(count)
            return cls._shared[key]

    def run(self, tasks: Sequence) -> list:
        """Run callables on the workers, started in the given order (largest first balances them
        best); their results in that order. Never call it from inside a task."""
        return [future.result() for future in [self._pool.submit(_single_threaded, task) for task in tasks]]


def _single_threaded(task):
    if torch.get_num_threads() != 1:  # never expected: every worker pinned itself at start
        torch.set_num_threads(1)
    return task()


class LoadedClip:
    """An open_clip model plus what scoring needs; `embed` is thread safe (read-only model)."""

    def __init__(self, model, preprocess, tokenizer, device: str, precision: str, name: str,
                 cpu_threads: int = 0):

        self.model = model
        self.pil_preprocess, mean, std = split_preprocess(preprocess)
        self.draft_side = draft_side_for(self.pil_preprocess)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) if mean else None
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) if std else None
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.name = name
        self.dynamic_text = supports_dynamic_text_length(model)
        self.context_length = int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77))
        self.channels_last = _has_conv_tower(model)
        self.workers = CpuWorkers.shared(cpu_threads or torch.get_num_threads()) if device == "cpu" else None

    # per element --------------------------------------------------------------------------------
    def prepare_image(self, image_bytes: bytes) -> np.ndarray:
        """Decode + preprocess one image; raises on corrupt bytes."""
        image = self.pil_preprocess(decode_image(image_bytes, self.draft_side))
        return np.asarray(image, dtype=np.uint8) if self.mean is not None else image.numpy()

    def tokenize(self, caption: str) -> np.ndarray:
        return self.fit_tokens(self.tokenizer([caption or ""])[0].numpy())

    def fit_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """The tokenizer's full-length ids as this model takes them (trimmed where padding may go)."""
        return trim_tokens(tokens) if self.dynamic_text else tokens

    def tokens_of(self, example: ClipInput) -> np.ndarray:
        return self.tokenize(example.caption) if example.tokens is None else self.fit_tokens(example.tokens)

    def prepare(self, example: ClipInput) -> tuple[np.ndarray, np.ndarray]:
        """Decode + preprocess one image and tokenise its caption; raises on corrupt bytes."""
        return self.prepare_image(example.image_bytes), self.tokens_of(example)

    # per batch ----------------------------------------------------------------------------------
    def pixels_tensor(self, pixels: Sequence[np.ndarray]):

        if self.mean is None:  # unrecognised transform: elements are already normalised floats
            batch = torch.from_numpy(np.stack(pixels)).to(self.device)
        else:  # uint8 HWC -> float NCHW, the ToTensor + Normalize tail for the whole batch at once
            batch = torch.from_numpy(np.stack(pixels)).to(self.device).permute(0, 3, 1, 2).float()
            batch = (batch / 255.0 - self.mean) / self.std
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch.half() if self.precision == "fp16" else batch

    def _context(self):
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.precision == "bf16" and self.device == "cpu"
            else contextlib.nullcontext()
        )
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())  # both are per thread: entered in each task
        stack.enter_context(autocast)
        return stack

    @property
    def batch_independent(self) -> bool:
        """Whether a sample's numbers are independent of the other samples of its batch."""
        return self.precision in BATCH_INDEPENDENT_PRECISIONS

    @property
    def chunk_rows(self) -> tuple[int, int]:
        """(images, captions) per forward pass: fixed, so that a pass's shape never varies."""
        return (IMAGE_CHUNK if self.workers is not None else ACCELERATOR_IMAGE_CHUNK), TEXT_CHUNK

    def _encode_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        rows = self.chunk_rows[0]
        padded = list(pixels) + [np.zeros_like(pixels[0])] * (rows - len(pixels))  # blank rows: a fixed shape
        with self._context():
            features = self.model.encode_image(self.pixels_tensor(padded))
            return F.normalize(features[: len(pixels)].float(), dim=-1).cpu().numpy()

    def _text_length(self, tokens: np.ndarray, full_length: bool) -> int:
        if self.dynamic_text and not full_length:
            return padded_text_length(len(tokens), self.context_length)
        return self.context_length

    def _encode_texts(self, tokens: Sequence[np.ndarray], length: int, full_length: bool) -> np.ndarray:
        blank = np.zeros(1, dtype=np.int64)
        padded = list(tokens) + [blank] * (self.chunk_rows[1] - len(tokens))  # blank rows: a fixed shape
        text = pad_tokens(padded, length).to(self.device)
        with self._context():
            dynamic = self.dynamic_text and not full_length
            features = encode_text_dynamic(self.model, text) if dynamic else self.model.encode_text(text)
            return F.normalize(features[: len(tokens)].float(), dim=-1).cpu().numpy()

    def _text_groups(self, tokens: Sequence[np.ndarray], full_length: bool) -> list[tuple[int, list[int]]]:
        """(padded length, caption indices) per pass: captions of one padded length, in chunks."""
        by_length: dict[int, list[int]] = {}
        for index, caption in enumerate(tokens):
            by_length.setdefault(self._text_length(caption, full_length), []).append(index)
        rows = self.chunk_rows[1]
        # longest first, for the workers' balance (the order of the pieces never changes a number)
        return [(length, indices[start:start + rows]) for length, indices in sorted(by_length.items(), reverse=True)
                for start in range(0, len(indices), rows)]

    def _image_groups(self, count: int) -> list[list[int]]:
        rows = self.chunk_rows[0]
        return [list(range(start, min(start + rows, count))) for start in range(0, count, rows)]

    def embed_each(self, load_pixels, count: int, tokens: Sequence[np.ndarray], full_length: bool = False):
        """Embed `count` elements: `load_pixels(i)` gives element i's pixels (or raises: that element
        gets an error and no image embedding), `tokens[i]` its caption's token ids.

        The batch is cut into image chunks (each decoded and preprocessed in the task that embeds
        it, so decoding overlaps the model) and caption chunks of one padded length, every pass of
        a fixed shape; on CPU the workers run the pieces in parallel. A sample's embeddings do not
        depend on the thread count, nor (but in int8) on the rest of its batch.
        Returns (image rows, text rows, {index: error}); image rows are None where it failed.
        """

        def image_task(part):
            def run():
                good, pixels, errors = [], [], {}
                for index in part:  # per element: one corrupt image must not fail the batch
                    try:
                        pixels.append(load_pixels(index))
                        good.append(index)
                    except Exception as error:  # noqa: BLE001 - untrusted bytes fail in many ways
                        errors[index] = _error_detail(error)
                return good, (self._encode_images(pixels) if pixels else None), errors
            return run

        def text_task(length, part):
            return lambda: (part, self._encode_texts([tokens[i] for i in part], length, full_length))

        image_parts = self._image_groups(count)
        tasks = [image_task(part) for part in image_parts]
        tasks += [text_task(length, part) for length, part in self._text_groups(tokens, full_length)]
        results = self.workers.run(tasks) if self.workers is not None else [task() for task in tasks]
        images, texts, errors = [None] * count, [None] * count, {}
        for good, features, failed in results[: len(image_parts)]:
            errors.update(failed)
            for row, index in enumerate(good):
                images[index] = features[row]
        for part, features in results[len(image_parts):]:
            for row, index in enumerate(part):
                texts[index] = features[row]
        return images, texts, errors

    def embed(self, pixels: Sequence[np.ndarray], tokens: Sequence[np.ndarray], full_length: bool = False):
        """L2-normalised fp32 image and text embeddings, as numpy [batch, dim] arrays."""
        images, texts, _ = self.embed_each(pixels.__getitem__, len(pixels), tokens, full_length)
        return np.stack(images), np.stack(texts)


def _has_conv_tower(model) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(getattr(model, "visual", None), ModifiedResNet)


def _probe_inputs(count: int = 8) -> list[ClipInput]:
    from pipeline import synthetic

    return [
        ClipInput(synthetic.encode_jpeg(image), attrs.caption())
        for attrs, image in synthetic.iter_samples(count, size=224, seed=7)
    ]


def register_sidecar_config(checkpoint_path: str) -> Optional[str]:
    """Register `<checkpoint stem>.json` (an open_clip model config) if present; returns its name."""
    import pathlib

    import open_clip

    sidecar = pathlib.Path(checkpoint_path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    config = json.loads(sidecar.read_text(encoding="utf-8"))
    if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        return None
    open_clip.add_model_config(sidecar)
    return sidecar.stem


def resolve_model_name(model_name: str, checkpoint_path: str = "") -> str:
    """The open_clip name to build: `model_name`, or the checkpoint's sidecar config when open_clip
    does not know that name."""
    import open_clip

    if checkpoint_path:
        registered = register_sidecar_config(checkpoint_path)
        if registered and model_name not in open_clip.list_models():
            return registered
    return model_name


_TOKENIZERS: dict = {}


def caption_tokenizer(model_name: str, checkpoint_path: str = ""):
    """The model's tokenizer without the model (one per process and model)."""
    import open_clip

    key = (model_name, checkpoint_path)
    with _LOAD_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = open_clip.get_tokenizer(resolve_model_name(model_name, checkpoint_path))
        return _TOKENIZERS[key]


def _int8_fidelity(reference: LoadedClip, candidate: LoadedClip) -> float:
    prepared = [reference.prepare(example) for example in _probe_inputs()]
    pixels, tokens = zip(*prepared)
    ref_image, ref_text = reference.embed(pixels, tokens)
    got_image, got_text = candidate.embed(pixels, tokens)
    cosines = np.concatenate([(ref_image * got_image).sum(1), (ref_text * got_text).sum(1)])
    return float(cosines.mean())


@contextlib.contextmanager
def weight_init_skipped():
    """While a model is built whose every weight a checkpoint then overwrites: torch.nn.init's
    fills do nothing. open_clip loads full checkpoints with strict=True, so no parameter keeps its
    unfilled memory. Loading ViT-B-32 from a local checkpoint took 0.93 s with the random init and
    takes 0.61 s without, on one core at the start of every fetch phase. (torch has no switch for
    this; transformers patches the same functions in its no_init_weights.) Process-wide while it
    lasts: loads hold _LOAD_LOCK."""
    fills = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")}
    try:
        for name in fills:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in fills.items():
            setattr(nn.init, name, fill)


def load_open_clip(
    model_name: str,
    pretrained: str = "",
    checkpoint_path: str = "",
    device: str = "auto",
    precision: str = "auto",
    cpu_threads: int = 0,
    batch_independent: bool = False,
) -> LoadedClip:
    """Load an open_clip model for scoring: hub `pretrained` tag, or a local checkpoint file.

    A checkpoint may ship its architecture as `<checkpoint stem>.json` beside it (an open_clip model
    config, as the project's tiny model does); it is registered under that stem's name.
    `cpu_threads`: CPU inference threads (0: torch's intra-op thread count, one per core).
    `batch_independent`: the pipeline scores rows in batches of any make-up, so `auto` must not
    pick int8 here (fp32 instead), even if the machine that built the pipeline would not have.
    """
    global LOAD_COUNT, LAST_LOAD_SECONDS, LAST_LOAD_CPU_SECONDS
    import copy
    import time

    import open_clip

    started, cpu_started = time.perf_counter(), time.process_time()
    with _LOAD_LOCK:
        LOAD_COUNT += 1
    tokenizer = caption_tokenizer(model_name, checkpoint_path)
    model_name = resolve_model_name(model_name, checkpoint_path)
    device = select_device(device)
    resolved = resolve_precision(precision, device)
    if batch_independent and resolved not in BATCH_INDEPENDENT_PRECISIONS:
        if precision != "auto":
            raise ValueError(f"clip precision {precision} depends on batch make-up; streamed scoring needs one that does not")
        log.warning("this CPU has no native bf16 and int8 depends on batch make-up: scoring in fp32")
        resolved = "fp32"
    precision = resolved
    weights = checkpoint_path or pretrained or None
    with _LOAD_LOCK, (weight_init_skipped() if weights else contextlib.nullcontext()):
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, device=device, precision="fp16" if precision == "fp16" else "fp32"
        )
    model.eval()
    use_sdpa_attention(model)
    prune_class_token_last_block(model)
    if device == "cpu":
        keep_freed_memory()
    if _has_conv_tower(model):
        model.visual.to(memory_format=torch.channels_last)
    loaded = LoadedClip(model, preprocess, tokenizer, device, precision, model_name, cpu_threads)
    if precision == "int8":
        candidate = LoadedClip(_quantize_int8(copy.deepcopy(model)), preprocess, tokenizer, device, "int8", model_name,
                               cpu_threads)
        fidelity = _int8_fidelity(loaded, candidate)
        if fidelity >= INT8_MIN_FIDELITY:
            loaded = candidate
        else:
            log.warning("int8 CLIP agrees with fp32 at only %.4f; scoring in fp32", fidelity)
            loaded.precision = "fp32"
        loaded.int8_fidelity = fidelity
    LAST_LOAD_SECONDS = time.perf_counter() - started
    LAST_LOAD_CPU_SECONDS = time.process_time() - cpu_started
    log.info("loaded CLIP %s (%s) on %s in %s in %.1fs", model_name, weights, device, loaded.precision, LAST_LOAD_SECONDS)
    return loaded


# ------------------------------------------------------------------------------------------------
# Beam: model handler and the fetch-phase transform
# ------------------------------------------------------------------------------------------------


class OpenClipModelHandler(ModelHandler):
    """RunInference handler: ClipInput(image_bytes, caption) -> PredictionResult with a dict of
    `image_embedding`, `text_embedding` (float16, L2-normalised), `clip_score`; or `error`."""

    def __init__(
        self,
        model_name: str,
        pretrained: str = "",
        checkpoint_path: str = "",
        device: str = "auto",
        min_batch_size: int = 8,
        max_batch_size: int = 64,
        precision: str = "auto",
        share_across_processes: bool = False,
        max_batch_duration_secs: Optional[int] = None,
        cpu_threads: int = 0,
        batch_independent: bool = False,
    ):
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
        )
        if not (pretrained or checkpoint_path):
            log.warning("CLIP %s has no weights (no pretrained tag, no checkpoint): random scores", model_name)
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.device = device
        self.precision = precision
        self.cpu_threads = cpu_threads
        self.batch_independent = batch_independent
        # Off by default: RunInference already shares one model per process between its threads;
        # this also shares one across the processes of a machine (for big models on small VMs).
        self._share_across_processes = share_across_processes

    def _load_arguments(self) -> tuple:
        return (self.model_name, self.pretrained, self.checkpoint_path, self.device, self.precision,
                self.cpu_threads, self.batch_independent)

    def load_model(self) -> LoadedClip:
        preloaded = _PRELOADED.pop(self._load_arguments(), None)  # resolve_model's, in this process
        return preloaded if preloaded is not None else load_open_clip(*self._load_arguments())

    def run_inference(
        self, batch: Sequence, model: LoadedClip, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[PredictionResult]:
        if batch and isinstance(batch[0], ClipBatch):
            return [
                PredictionResult(micro, [r.inference for r in self._score(micro.examples, model, inference_args)],
                                 model_id=model.name)
                for micro in batch
            ]
        return self._score(batch, model, inference_args)

    def _score(
        self, batch: Sequence[ClipInput], model: LoadedClip, inference_args: Optional[dict[str, Any]] = None
    ) -> list[PredictionResult]:
        tokens = [model.tokens_of(example) for example in batch]
        # images are decoded per element inside the embedding tasks: a corrupt one is an error for
        # that element only, and decoding runs in parallel with the model on the CPU workers
        images, texts, errors = model.embed_each(
            lambda i: model.prepare_image(batch[i].image_bytes), len(batch), tokens,
            full_length=bool((inference_args or {}).get("full_length")),
        )
        results = []
        for i, example in enumerate(batch):
            if i in errors:
                inference = {"error": errors[i]}
            else:
                image, text = images[i], texts[i]
                inference = {
                    "image_embedding": image.astype(EMBEDDING_DTYPE),
                    "text_embedding": text.astype(EMBEDDING_DTYPE),
                    "clip_score": float(np.dot(image, text)),
                }
            results.append(PredictionResult(example, inference, model_id=model.name))
        return results

    def get_num_bytes(self, batch: Sequence) -> int:
        examples = [e for item in batch for e in (item.examples if isinstance(item, ClipBatch) else (item,))]
        return sum(len(e.image_bytes or b"") + len((e.caption or "").encode()) for e in examples)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def validate_inference_args(self, inference_args: Optional[dict[str, Any]]):
        unknown = set(inference_args or {}) - {"full_length"}
        if unknown:
            raise ValueError(f"unknown CLIP inference args: {sorted(unknown)}")

    def share_model_across_processes(self) -> bool:
        return self._share_across_processes


def _error_detail(error: Exception) -> str:
    # no object addresses in the ledger: the same input must give the same bytes
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


def launcher_precision(config) -> str:
    """The precision `config` resolves to on this machine (where the pipeline is built)."""
    return resolve_precision(getattr(config, "clip_precision", "auto"), select_device(config.clip_device))


def scores_where_produced(config) -> bool:
    """Whether ClipScoring scores rows as they arrive, batched as they come (no shuffle before the
    model): when batches need not be deterministic, or when the precision makes a sample's numbers
    independent of its batch. Else (int8, deterministic) micro-batches are cut by uid after a shuffle."""
    deterministic = bool(getattr(config, "clip_deterministic_batches", True))
    return not deterministic or launcher_precision(config) in BATCH_INDEPENDENT_PRECISIONS


def handler_from_config(config) -> OpenClipModelHandler:
    deterministic = bool(getattr(config, "clip_deterministic_batches", True))
    grouped = not scores_where_produced(config)
    return OpenClipModelHandler(
        model_name=config.clip_model,
        pretrained="" if config.clip_checkpoint else config.clip_pretrained,
        checkpoint_path=config.clip_checkpoint,
        device=config.clip_device,
        # with upstream micro-batches, RunInference's elements are whole batches already
        min_batch_size=1 if grouped else config.clip_min_batch_size,
        max_batch_size=1 if grouped else config.clip_max_batch_size,
        precision=getattr(config, "clip_precision", "auto"),
        cpu_threads=int(getattr(config, "clip_cpu_threads", 0) or 0),
        batch_independent=deterministic and not grouped,
    )


# ------------------------------------------------------------------------------------------------
# Resolving the model before any work starts
# ------------------------------------------------------------------------------------------------

_PRELOADED: dict = {}  # load arguments -> the model resolve_model loaded, for this process's handler
HUB_PROBE_TIMEOUT_S = 5.0
_INSTEAD = "pass --set clip_checkpoint=PATH (a local checkpoint) or --set clip_enabled=false"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:240]


def _hub_reachable(url: str) -> Optional[str]:
    """None when a TCP connection to the host of `url` opens; else why not. A quick look before
    the hub client's own retries, which take a minute to give up on a machine that is offline."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{parts.hostname}:{port} cannot be reached ({error.strerror or type(error).__name__})"
    return None


def fetch_hub_weights(model_name: str, tag: str) -> str:
    """The local path of open_clip's `tag` weights for `model_name`, downloaded now if they are not
    in the cache yet. Raises UsageError saying what to pass instead when they cannot be had."""
    import open_clip
    from open_clip import pretrained as hub

    from pipeline.errors import UsageError, did_you_mean

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        known = ", ".join(tags[:8]) or "none"
        raise UsageError(f"open_clip has no weights {tag!r} for {model_name} (clip_pretrained)"
                         + did_you_mean(tag, tags) + f"; its tags: {known}; or {_INSTEAD}")
    cfg = hub.get_pretrained_cfg(model_name, tag)
    source = cfg.get("hf_hub", "")
    if source and hub.has_hf_hub():
        import huggingface_hub

        repo, filename = os.path.split(source)
        cached = huggingface_hub.try_to_load_from_cache(repo, filename or "open_clip_pytorch_model.bin")
        if isinstance(cached, str):
            return cached
        endpoint = huggingface_hub.constants.ENDPOINT
    else:
        endpoint = cfg.get("url", "")
    unreachable = _hub_reachable(endpoint) if endpoint else None
    if unreachable:
        raise UsageError(f"the CLIP weights {model_name}:{tag} are not in the local cache and the hub is offline "
                         f"({unreachable}); {_INSTEAD}")
    try:
        return hub.download_pretrained(cfg)
    except Exception as error:  # noqa: BLE001 - whatever the hub client raises, the user's fix is the same
        raise UsageError(f"cannot fetch the CLIP weights {model_name}:{tag} ({_first_line(error)}); {_INSTEAD}") from None


def resolve_model(config, keep: bool) -> None:
    """Before any work starts: the model named by the config exists, its weights can be had and
    it loads. Raises UsageError (one line saying what to pass instead) when not. `keep`: the
    loaded model is handed to this process's first handler load (the in-process runner scores
    in this process) instead of being loaded twice."""
    import open_clip

    from pipeline.errors import UsageError, did_you_mean

    checkpoint = config.clip_checkpoint
    check_checkpoint_file(config)
    name = resolve_model_name(config.clip_model, checkpoint)
    known = open_clip.list_models()
    if name not in known and not name.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"open_clip has no model {config.clip_model!r} (clip_model)" + did_you_mean(name, known)
                         + "; open_clip.list_models() lists them (a checkpoint may ship its own as <stem>.json)")
    if not checkpoint and config.clip_pretrained:
        fetch_hub_weights(name, config.clip_pretrained)
    handler = handler_from_config(config)
    try:
        loaded = handler.load_model()
    except Exception as error:  # noqa: BLE001 - a user's checkpoint can fail to unpickle in any way
        weights = f"the checkpoint {checkpoint!r}" if checkpoint else f"the weights {config.clip_pretrained!r}"
        raise UsageError(f"{weights} does not load as CLIP model {config.clip_model} ({_first_line(error)}): is it an "
                         "open_clip checkpoint of the architecture clip_model names? Or pass --set clip_enabled=false"
                         ) from None
    if keep:
        _PRELOADED[handler._load_arguments()] = loaded


BATCHES_PER_GROUP = 8  # groups of ~8 micro-batches: small enough to sort in memory, big enough to fill batches


def _group_count(total: int, batch_size: int) -> int:
    return max(1, -(-total // (batch_size * BATCHES_PER_GROUP)))


def clip_input(record: dict, reader: RawImageReader, tokens: Optional[np.ndarray] = None) -> tuple[dict, ClipInput]:
    """(record, ClipInput): the caption CLIP scores (and its `tokens`, if known) and the record's image."""
    caption = caption_of(record)
    try:
        image = reader.image_of(record)
    except (OSError, KeyError) as error:  # decoding b"" fails: the row becomes DECODE_ERROR
        log.warning("raw image of %s unreadable: %s", record.get(Col.UID), error)
        image = b""
    return record, ClipInput(image, caption, tokens)


class _OrdersByCaptionLength(ReadsRawImages):
    """Base of the DoFns that hand records to the model: knows each caption's padded length (the
    model's tokenizer, loaded once per process), to put captions of one length together."""

    def __init__(self, raw_directory: str, model_name: str, checkpoint_path: str):
        super().__init__(raw_directory)
        self._model_name = model_name
        self._checkpoint_path = checkpoint_path

    def setup(self):
        super().setup()
        self._tokenizer = caption_tokenizer(self._model_name, self._checkpoint_path)

    def _tokens(self, record: dict) -> np.ndarray:
        """The caption's full-length ids: they go on to the model with it, never tokenised twice."""
        return self._tokenizer([caption_of(record)])[0].numpy()


def _padded_length_of(tokens: np.ndarray) -> int:
    return padded_text_length(len(trim_tokens(tokens)), len(tokens))


class _MicroBatches(_OrdersByCaptionLength):
    """Sort a group by (caption length, uid) and cut it into micro-batches: the same samples, the
    same batches, whose captions fill few text passes. Images are loaded here, one micro-batch at a
    time, never before the shuffle."""

    def __init__(self, batch_size: int, raw_directory: str, model_name: str, checkpoint_path: str):
        super().__init__(raw_directory, model_name, checkpoint_path)
        self._batch_size = batch_size

    def process(self, bucket_and_records):
        _, records = bucket_and_records
        tokenized = [(self._tokens(record), record) for record in records]
        ordered = sorted(tokenized, key=lambda pair: (_padded_length_of(pair[0]), pair[1][Col.UID]))
        for start in range(0, len(ordered), self._batch_size):
            chunk = [clip_input(record, self._reader, tokens) for tokens, record in ordered[start:start + self._batch_size]]
            yield tuple(record for record, _ in chunk), ClipBatch(tuple(example for _, example in chunk))


class _InputsInRuns(_OrdersByCaptionLength):
    """(record, ClipInput) per record, re-ordered so that captions of one padded length come out
    in runs of TEXT_CHUNK: RunInference's batches (a multiple of TEXT_CHUNK) then fill whole text
    passes instead of part-filling one per length per batch, which on web captions made the text
    tower ~2x dearer. Only speed depends on this order: a pass has a fixed shape, so no number
    does. Holds at most TEXT_CHUNK - 1 records per padded length (~20 lengths)."""

    def start_bundle(self):
        self._runs: dict[int, list] = {}

    def process(self, record: dict):
        tokens = self._tokens(record)
        length = _padded_length_of(tokens)
        run = self._runs.setdefault(length, [])
        run.append(clip_input(record, self._reader, tokens))
        if len(run) == TEXT_CHUNK:
            del self._runs[length]
            yield from run

    def finish_bundle(self):
        for length in sorted(self._runs):
            for item in self._runs.pop(length):
                yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])


def _unbatch(keyed):
    """One (record, prediction) per sample. The prediction leaves its example (the image bytes)
    behind: nothing after the model carries them."""
    records, result = keyed
    for record, inference in zip(records, result.inference):
        yield record, PredictionResult(None, inference, model_id=result.model_id)


def _without_example(keyed):
    record, result = keyed
    return record, PredictionResult(None, result.inference, model_id=result.model_id)


def attach_scores(record: dict, result: PredictionResult) -> dict:
    """Copy one prediction into its record, or mark the record DECODE_ERROR."""
    inference = result.inference
    if "error" in inference:
        return mark_dropped(record, DropReason.DECODE_ERROR, f"clip: {inference['error']}")
    record[Col.IMAGE_EMBEDDING] = inference["image_embedding"]
    record[Col.TEXT_EMBEDDING] = inference["text_embedding"]
    record[Col.CLIP_SCORE] = inference["clip_score"]
    return record


_SKIP = "skip"


def _route(record: dict):
    """Rows dropped upstream skip the model (their first reason stands); the rest get scored."""
    if is_dropped(record):
        yield beam.pvalue.TaggedOutput(_SKIP, (record, None))
    else:
        yield record


class _AttachDoFn(beam.DoFn):
    def __init__(self, release_images: bool = False):
        self._release_images = release_images  # stored already (raw/): nothing after the model needs them
        self._scored = Metrics.counter(METRICS_NAMESPACE, "scored")
        self._dropped = Metrics.counter(METRICS_NAMESPACE, f"dropped_{DropReason.DECODE_ERROR.value}")

    def process(self, keyed):
        record, result = keyed
        if result is None:  # dropped before this stage
            record.pop(Col.IMAGE_BYTES, None)
            yield beam.pvalue.TaggedOutput(DROPPED, record)
            return
        record = attach_scores(record, result)
        if is_dropped(record):
            self._dropped.inc()
            record.pop(Col.IMAGE_BYTES, None)  # dead letters never carry image bytes
            yield beam.pvalue.TaggedOutput(DROPPED, record)
        else:
            self._scored.inc()
            if self._release_images:
                record.pop(Col.IMAGE_BYTES, None)
            yield record


class ScoredRows(NamedTuple):
    kept: beam.PCollection
    dropped: beam.PCollection


class ClipScoring(beam.PTransform):
    """records -> `.kept` (with embeddings and clip_score) and `.dropped` (DECODE_ERROR, plus rows
    that arrived already dropped), the same result shape as ApplyStage.

    Images come from each record's IMAGE_BYTES, else from `raw_directory` (where WriteRawImages put
    them). With `images_inline`, every record carries its bytes, and they are released once the
    record is scored; then, when scores do not depend on batch make-up (`scores_where_produced`),
    rows are scored in the stage that produces them, with no shuffle, so the model works while
    upstream still downloads. (Else the uid-ordered micro-batches follow a shuffle, which inline
    bytes would cross: fetch keeps them inline only when they will not.)"""

    def __init__(self, config, handler: Optional[OpenClipModelHandler] = None, label: str = "ClipScoring",
                 raw_directory: str = "", images_inline: bool = False):
        super().__init__(label=label)
        self._handler = handler or handler_from_config(config)
        self._model_files = (self._handler.model_name, self._handler.checkpoint_path)
        self._raw_directory = raw_directory
        self._images_inline = images_inline
        self._grouped = not scores_where_produced(config)
        self._batch_size = int(config.clip_max_batch_size)

    def expand(self, records):
        routed = records | "Route" >> beam.FlatMap(_route).with_outputs(_SKIP, main="score")
        if self._grouped:
            size = self._batch_size
            total = beam.pvalue.AsSingleton(routed.score | "Count" >> beam.combiners.Count.Globally())
            inferred = (
                routed.score
                | "Bucket" >> beam.Map(
                    lambda record, n: (zlib.crc32(record[Col.UID].encode()) % _group_count(n, size), record), n=total)
                | "Group" >> beam.GroupByKey()
                | "MicroBatches" >> beam.ParDo(_MicroBatches(size, self._raw_directory, *self._model_files))
                | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
                | "Unbatch" >> beam.FlatMap(_unbatch)
            )
        else:
            scored = routed.score
            if not self._images_inline:
                # a shuffle first: the raw tars of the upstream bundle are complete once it commits
                scored = scored | "Barrier" >> beam.Reshuffle()
            inferred = (
                scored
                | "InputsInRuns" >> beam.ParDo(_InputsInRuns(self._raw_directory, *self._model_files))
                | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
                | "DropExamples" >> beam.Map(_without_example)
            )
        # Scored rows are attached right after the model, in the same fused stage: a Flatten with
        # the skipped rows first would have the in-memory runner hold every scored row at once.
        attached = inferred | "Attach" >> beam.ParDo(_AttachDoFn(self._images_inline)).with_outputs(DROPPED, main=KEPT)
        skipped = routed[_SKIP] | "Skipped" >> beam.ParDo(_AttachDoFn()).with_outputs(DROPPED, main=KEPT)
        dropped = (attached[DROPPED], skipped[DROPPED]) | "Dropped" >> beam.Flatten()
        return ScoredRows(attached[KEPT], dropped)
