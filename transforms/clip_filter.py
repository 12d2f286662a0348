"""The CLIP filter (decide phase): deciding from the scores the fetch phase computed.

Kept apart from `clip_score` (the model, torch) as Data-Juicer keeps computing stats apart from
deciding: the decide phase needs only these few functions, and importing torch would cost it
~600 MB of resident memory (the CUDA build's libraries) for nothing.

`clip_drop_reason` (pure) turns `clip_score` into a LOW_CLIP_SCORE drop: an absolute threshold,
per-language thresholds, or the global top X% (Beam ApproximateQuantiles over the whole dataset,
`GlobalClipCutoff`, as a side input: never per shard); `pipeline.decide` applies them. Scores stay
in the features table for dropped rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import apache_beam as beam
import numpy as np

from schemas import Col, DropReason


def model_id(config) -> str:
    """What the run metadata records about the scoring model: `name:tag` or `name@checkpoint`."""
    if getattr(config, "clip_checkpoint", ""):
        return f"{config.clip_model}@{config.clip_checkpoint}"
    return f"{config.clip_model}:{config.clip_pretrained or 'random-init'}"


def check_checkpoint_file(config) -> None:
    """A local `clip_checkpoint` must be a file that exists (UsageError, one line, otherwise).
    Here, without torch, so the launcher can say it before any phase starts."""
    import os

    from pipeline.errors import UsageError

    checkpoint = getattr(config, "clip_checkpoint", "")
    if not checkpoint or "://" in checkpoint:
        return
    if not os.path.exists(checkpoint):
        raise UsageError(f"the CLIP checkpoint {checkpoint!r} (clip_checkpoint) does not exist; "
                         "pass --set clip_checkpoint=PATH of an existing file, or --set clip_enabled=false")
    if not os.path.isfile(checkpoint):
        raise UsageError(f"the CLIP checkpoint {checkpoint!r} (clip_checkpoint) is not a file; "
                         "pass --set clip_checkpoint=PATH of a checkpoint file, or --set clip_enabled=false")


def threshold_for(lang: Optional[str], default: float, per_lang: Optional[dict]) -> float:
    if per_lang and lang is not None and lang in per_lang:
        return float(per_lang[lang])
    return float(default)


def is_low_score(score: Optional[float], threshold: float) -> bool:
    """Below the threshold drops; a missing score never does (that row was dropped for another reason)."""
    return score is not None and float(score) < threshold


def quantile_cutoff(quantiles: Sequence[float], keep_top_percent: float) -> float:
    """Score at the (100 - keep_top_percent) percentile from ApproximateQuantiles' 101 cut points."""
    if not quantiles:
        return float("-inf")
    if len(quantiles) == 1:
        return float(quantiles[0])
    position = (100.0 - keep_top_percent) / 100.0 * (len(quantiles) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(quantiles) - 1)
    fraction = position - low
    return float(quantiles[low] * (1 - fraction) + quantiles[high] * fraction)


def clip_drop_reason(record: dict, config, global_cutoff: Optional[float] = None) -> Optional[DropReason]:
    """The decision half of the CLIP filter (pure): LOW_CLIP_SCORE when the record's score is below
    the global cutoff (`clip_keep_top_percent` mode, from `GlobalClipCutoff`) or else below its
    language's threshold."""
    if config.clip_keep_top_percent is not None:
        threshold = float("-inf") if global_cutoff is None else global_cutoff
    else:
        threshold = threshold_for(record.get(Col.LANG), config.clip_threshold, config.clip_thresholds_per_lang)
    return DropReason.LOW_CLIP_SCORE if is_low_score(record.get(Col.CLIP_SCORE), threshold) else None


class GlobalClipCutoff(beam.PTransform):
    """The statistics half of the CLIP filter: CLIP scores (floats, one per alive row) -> one
    float, the score at the global (100 - `clip_keep_top_percent`) percentile (Beam
    ApproximateQuantiles over the whole dataset, never per shard or per bundle). Use it only when
    that mode is set; pass it to `clip_drop_reason` as a singleton side input."""

    QUANTILES = 1000  # cut points: 0.1% resolution

    def __init__(self, config, label: str = "GlobalClipCutoff"):
        super().__init__(label=label)
        self._top_percent = config.clip_keep_top_percent
        if self._top_percent is None or not 0 < float(self._top_percent) <= 100:
            raise ValueError(f"clip_keep_top_percent must be in (0, 100], got {self._top_percent}")

    def expand(self, scores):
        top = float(self._top_percent)
        return (
            scores
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(self.QUANTILES + 1)
            | "Cutoff" >> beam.Map(lambda q: quantile_cutoff(q, top))
        )
