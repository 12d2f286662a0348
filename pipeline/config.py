"""Typed configuration shared by the three phases.

One flat dataclass: a YAML file (`--config`) and `--set key=value` both address its fields by name,
and values are coerced to the field's declared type, so a typo or a wrong type fails at start-up,
not hours into a Dataflow job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, Optional

import yaml

PROJECT_NAME = "curate"
PROJECT_VERSION = "0.1.0"
DEFAULT_USER_AGENT = (
    f"{PROJECT_NAME}-bot/{PROJECT_VERSION} (image-text dataset curation; honours robots.txt, TDMRep, "
    "Content-Usage and X-Robots-Tag noai)"
)

RESIZE_MODES = ("border", "keep_ratio", "center_crop", "no")
INPUT_FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "webdataset")


@dataclasses.dataclass
class CurateConfig:
    # ---- input ---------------------------------------------------------------------------
    input: str = ""
    output: str = ""
    input_format: str = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    max_field_bytes: int = 10_000_000  # csv field limit; longer captions become caption_too_long

    # ---- download ------------------------------------------------------------------------
    max_in_flight: int = 128  # concurrent requests per worker process
    per_host_concurrency: int = 16
    request_deadline_s: float = 20.0  # total per attempt: connect + headers + body
    connect_timeout_s: float = 5.0
    retries: int = 2  # extra attempts for transient failures only
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 30.0  # a longer Retry-After is not waited for
    max_body_bytes: int = 20_000_000
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    respect_noai: bool = True
    ssrf_guard: bool = True
    allow_hosts: list = dataclasses.field(default_factory=list)  # "host:port" loopback exceptions

    # ---- site policies: responsible crawling, every check on by default (README) ---------
    respect_robots_txt: bool = True  # RFC 9309 robots.txt of each image's own host (+ Crawl-delay)
    respect_tdmrep: bool = True  # W3C TDMRep: tdm-reservation header and /.well-known/tdmrep.json
    respect_content_usage: bool = True  # IETF AIPREF: Content-Usage header and robots.txt rule
    robots_token: str = ""  # our product token in robots.txt groups; "" = user_agent's first product name
    policy_cache_hosts: int = 4096  # origins (scheme, host, port) whose policies a worker keeps (LRU)
    policy_ttl_s: float = 86_400.0  # RFC 9309 2.4: a cached robots.txt is used for at most 24 h
    policy_error_ttl_s: float = 600.0  # how long a 5xx/429/unreachable robots.txt keeps the site disallowed
    policy_max_bytes: int = 524_288  # robots.txt / tdmrep.json are parsed up to this (RFC 9309: >= 500 KiB)
    crawl_delay_max_s: float = 10.0  # Crawl-delay is honoured up to this per-host interval
    # fixed answers for host names, like curl --resolve ({name: address}); still checked by the
    # SSRF guard (loopback needs --allow-host). Tests and benchmarks map many names to 127.0.0.1.
    resolve_hosts: dict = dataclasses.field(default_factory=dict)

    # ---- decode / image rules ------------------------------------------------------------
    max_pixels: int = 80_000_000
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_quality: int = 95
    min_image_size: int = 32  # shorter side, in original pixels
    max_aspect_ratio: float = 6.0
    blank_std_threshold: float = 3.0  # grey-level std dev of a thumbnail below this is blank

    # ---- captions ------------------------------------------------------------------------
    min_caption_words: int = 3  # DataComp basic filter: more than 2 words...
    min_caption_chars: int = 6  # ...and more than 5 characters
    max_caption_chars: int = 2000
    drop_boilerplate_captions: bool = True
    languages: list = dataclasses.field(default_factory=list)  # empty: keep all, tag them
    lang_min_score: float = 0.5  # below it the language is "und"
    langid_backend: str = "auto"  # auto | fasttext | lingua | lingua_low | langdetect | none (off: lang und)

    # ---- dedup ---------------------------------------------------------------------------
    dedup_exact: bool = True
    dedup_near: bool = True
    dedup_radius: int = 8
    dedup_max_bucket: int = 5000  # larger (band, value) buckets are split and reported
    dedup_mirror: bool = True  # a horizontally flipped copy is a duplicate
    dedup_min_descriptor_similarity: float = 0.8  # thumbnail correlation a pHash candidate needs
    dedup_max_descriptor_distance: float = 16.0  # thumbnail colour residual (0-255) after a global brightness fit
    dedup_min_embedding_cosine: float = 0.9  # CLIP image cosine, required too when both have one
    # up to this many samples (after the filters) candidates are searched over all of them by hash
    # bands; above it, inside each CLIP image-embedding group (approximate: README, Deduplication)
    dedup_exact_max: int = 50_000
    dedup_candidates_per_sample: int = 32  # grouped search: the closest candidates of a sample checked

    # ---- CLIP ----------------------------------------------------------------------------
    clip_enabled: bool = True
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"  # open_clip hub tag, used when no checkpoint
    clip_checkpoint: str = ""  # local checkpoint path; wins over clip_pretrained
    clip_device: str = "auto"
    # byte-identical reruns on any runner: fp32/bf16/fp16 scores never depend on batch make-up, so
    # rows are scored as they come; int8's do, so its batches are formed by uid after a shuffle
    clip_deterministic_batches: bool = True
    clip_precision: str = "auto"  # auto | fp32 | fp16 | bf16 | int8 (auto: fp16 on CUDA, checked int8/bf16 on CPU)
    clip_cpu_threads: int = 0  # CPU inference threads per process, each single-threaded in torch (0: one per core)
    # pairs per model call; min = max (a multiple of 32, the pass size): full, fixed passes
    clip_min_batch_size: int = 64
    clip_max_batch_size: int = 64
    clip_threshold: float = 0.28
    clip_thresholds_per_lang: dict = dataclasses.field(default_factory=dict)
    clip_keep_top_percent: Optional[float] = None  # DataComp style, global quantile

    # ---- hard negatives ------------------------------------------------------------------
    negatives_k: int = 3
    negatives_ceiling: float = 0.95
    negatives_exact_max: int = 50_000  # up to this many samples: one exact faiss search
    negatives_centroids: int = 0  # partitioned path: k-means centroids; 0 = ceil(n / negatives_group_size)
    negatives_group_size: int = 1000  # target samples per centroid when negatives_centroids is 0
    negatives_probe: int = 2  # each sample is a candidate in the groups of its nearest c centroids
    negatives_sample: int = 65_536  # k-means training sample (smallest uid hashes: same every run)
    negatives_captions: bool = True  # rule-based one-edit caption negatives (swap/attribute/object)
    # rows of one partition of the decide phase's columnar shuffles: what one worker holds at a time
    decide_partition_rows: int = 65_536

    # ---- write ---------------------------------------------------------------------------
    samples_per_shard: int = 1000
    raw_images_per_file: int = 1000  # fetch phase: images per raw tar (per bundle; never shuffled)
    ledger_rows_per_file: int = 100_000

    def validate(self) -> "CurateConfig":
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        for name in ("max_in_flight", "per_host_concurrency", "samples_per_shard", "raw_images_per_file", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("retries and max_redirects must be >= 0")
        _validate_site_policy_keys(self)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def robots_product_token(config: CurateConfig) -> str:
    """The token robots.txt groups and X-Robots-Tag scopes name us by: `robots_token`, else the
    product name that starts `user_agent` ("curate-bot/0.1.0 (...)" -> "curate-bot"), lower case."""
    return (config.robots_token or config.user_agent.split("/", 1)[0]).strip().lower()


def _validate_site_policy_keys(config: CurateConfig) -> None:
    token = robots_product_token(config)
    if not token or not all(c.isascii() and (c.isalpha() or c in "-_") for c in token):
        raise ValueError(f"robots_token {token!r}: RFC 9309 product tokens are letters, '-' and '_' only; "
                         "set robots_token=NAME (or a user_agent that starts with NAME/VERSION)")
    for name in ("policy_cache_hosts", "policy_max_bytes"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive")
    for name in ("policy_ttl_s", "policy_error_ttl_s", "crawl_delay_max_s"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0")


_FIELDS = {f.name: f for f in dataclasses.fields(CurateConfig)}

# Which phase each key feeds: a finished phase is re-run by `curate run` only when one of its
# keys changed (so a new threshold re-runs decide + write and downloads nothing).
_DECIDE_PREFIXES = ("dedup_", "negatives_", "decide_")
_DECIDE_KEYS = frozenset({"languages", "clip_threshold", "clip_thresholds_per_lang", "clip_keep_top_percent"})
_WRITE_KEYS = frozenset({"samples_per_shard", "ledger_rows_per_file"})
_NO_PHASE_KEYS = frozenset({"output", "clip_cpu_threads"})  # CLIP outputs do not depend on the thread count


def phase_of_key(key: str) -> str:
    if key in _NO_PHASE_KEYS:
        return ""
    if key in _WRITE_KEYS:
        return "write"
    if key in _DECIDE_KEYS or key.startswith(_DECIDE_PREFIXES):
        return "decide"
    return "fetch"


def phase_fingerprint(config: CurateConfig, phase: str) -> str:
    values = {k: v for k, v in dataclasses.asdict(config).items() if phase_of_key(k) == phase}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _coerce(name: str, value: Any) -> Any:
    """Coerce a YAML value or a --set string to the declared type of field `name`."""
    hint = typing.get_type_hints(CurateConfig)[name]
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if hint is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        text = str(value).strip()
        return [part.strip() for part in text.split(",") if part.strip()] if text else []
    if hint is dict:
        if isinstance(value, dict):
            return dict(value)
        parsed = yaml.safe_load(str(value))  # accepts {en: 0.3, de: 0.25} or JSON
        if not isinstance(parsed, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return parsed
    if hint in (int, float, str):
        return hint(value)
    raise TypeError(f"unsupported config type for {name}: {hint}")


def build_config(
    config_file: Optional[str] = None, overrides: Optional[list[str]] = None, **explicit: Any
) -> CurateConfig:
    """Defaults < YAML file < `--set key=value` overrides < explicit keyword arguments."""
    values: dict[str, Any] = {}
    if config_file:
        with open(config_file, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        values[key.strip()] = raw
    values.update({k: v for k, v in explicit.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return CurateConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
