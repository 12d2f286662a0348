"""Typed configuration shared by the three phases.

One flat dataclass: a YAML file (`--config`) and `--set key=value` both address its fields by name,
and values are coerced to the field's declared type, so a typo or a wrong type fails at start-up,
not hours into a Dataflow job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from typing import Any, Optional

import yaml

from pipeline.errors import UsageError, did_you_mean

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
    blank_std_threshold: float = 3.0  # per-channel std dev of a 32x32 thumbnail below this: look for ink
    blank_ink_contrast: float = 16.0  # levels from the background colour that make a pixel ink
    blank_min_ink_pixels: int = 16  # connected ink pixels that make a near-uniform image not blank

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
    negatives_recall_queries: int = 256  # sampled kept samples whose neighbours are checked against exact search
    negatives_captions: bool = True  # rule-based one-edit caption negatives (swap/attribute/object)
    # rows of one partition of the decide phase's columnar shuffles: what one worker holds at a time
    decide_partition_rows: int = 65_536

    # ---- write ---------------------------------------------------------------------------
    samples_per_shard: int = 1000
    raw_images_per_file: int = 1000  # fetch phase: images per raw tar (per bundle; never shuffled)
    ledger_rows_per_file: int = 100_000

    # ---- error ceiling (checked when a run ends; the outputs are written either way) -----
    # A run where most rows fail the same way is a broken run, not a small dataset: above these
    # shares `curate run|write|fetch` exits 4 with the top reasons. 1.0 turns a check off.
    max_internal_error_share: float = 0.01  # internal_error rows / all rows
    # Failed downloads / rows that reached the download. Old URL lists lose a third to a half of
    # their links to rot, so the default only catches a run where nearly nothing could be fetched.
    max_download_failure_share: float = 0.9

    def validate(self) -> "CurateConfig":
        """Values that would make a run fail late or silently drop everything fail here, in one
        line that names the key (ConfigError)."""
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                                  + did_you_mean(str(getattr(self, name)), choices))
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value!r}")
        if self.clip_keep_top_percent is not None and self.clip_keep_top_percent <= 0:
            raise ConfigError(f"clip_keep_top_percent must be above 0 (it keeps the top X%), got {self.clip_keep_top_percent!r}")
        if self.url_col == self.caption_col:
            raise ConfigError(f"url_col and caption_col name the same column {self.url_col!r}; "
                              "pass --url-col and --caption-col of two columns")
        for entry in self.allow_hosts:
            host, sep, port = str(entry).strip().rpartition(":")
            if not (sep and host and port.isdigit()):
                raise ConfigError(f"--allow-host expects HOST:PORT (e.g. 127.0.0.1:8000), got {entry!r}")
        if self.clip_min_batch_size > self.clip_max_batch_size:
            raise ConfigError(f"clip_min_batch_size ({self.clip_min_batch_size}) must not exceed "
                              f"clip_max_batch_size ({self.clip_max_batch_size})")
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"max_aspect_ratio is longer side / shorter side, so >= 1; got {self.max_aspect_ratio!r}")
        self.languages = [_language_code(code) for code in self.languages]
        for lang, threshold in self.clip_thresholds_per_lang.items():
            _language_code(lang, "clip_thresholds_per_lang")
            if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1 <= threshold <= 1:
                raise ConfigError(f"clip_thresholds_per_lang: the threshold of {lang!r} must be a number between -1 "
                                  f"and 1 (a cosine), got {threshold!r}")
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

_CHOICES = {
    "input_format": INPUT_FORMATS,
    "resize_mode": RESIZE_MODES,
    "langid_backend": ("auto", "fasttext", "lingua", "lingua_low", "langdetect", "none"),
    "clip_device": ("auto", "cpu", "cuda"),
    "clip_precision": ("auto", "fp32", "fp16", "bf16", "int8"),
}
_POSITIVE = ("max_in_flight", "per_host_concurrency", "samples_per_shard", "raw_images_per_file", "image_size",
             "request_deadline_s", "connect_timeout_s", "max_body_bytes", "max_pixels", "max_field_bytes",
             "clip_min_batch_size", "clip_max_batch_size", "ledger_rows_per_file", "negatives_group_size", "negatives_probe", "negatives_sample", "dedup_max_bucket", "max_caption_chars")
_NOT_NEGATIVE = ("retries", "max_redirects", "backoff_base_s", "backoff_max_s", "max_retry_after_s",
                 "min_image_size", "min_caption_words", "min_caption_chars", "dedup_radius", "negatives_k",
                 "negatives_centroids", "clip_cpu_threads", "blank_std_threshold",
                 "blank_ink_contrast", "blank_min_ink_pixels",
                 "negatives_exact_max",  # 0: always the partitioned search
                 "negatives_recall_queries")
_RANGES = {
    "encode_quality": (1, 100),
    "lang_min_score": (0.0, 1.0),
    "clip_threshold": (-1.0, 1.0),  # a cosine: above 1 nothing could be kept
    "clip_keep_top_percent": (0.0, 100.0),
    "negatives_ceiling": (-1.0, 1.0),
    "dedup_radius": (0, 63),  # bits of a 64-bit pHash
    "dedup_min_descriptor_similarity": (-1.0, 1.0),
    "dedup_min_embedding_cosine": (-1.0, 1.0),
    "max_internal_error_share": (0.0, 1.0),
    "max_download_failure_share": (0.0, 1.0),
}


class ConfigError(UsageError):
    """A config key or value the user must fix; the message names the key."""


def _language_code(code: Any, key: str = "languages") -> str:
    """A language as the `lang` column spells it (ISO 639-1, lower case; `und` for unknown)."""
    text = str(code).strip().lower()
    if re.fullmatch(r"[a-z]{2,3}", text):
        return text
    hint = ""
    try:  # lingua knows the English names of the languages it detects: "german" -> de
        from lingua import Language

        language = getattr(Language, text.upper().replace(" ", "_"), None)
        if language is not None:
            hint = f" (did you mean {language.iso_code_639_1.name.lower()}?)"
    except ImportError:
        pass
    raise ConfigError(f"{key}: {code!r} is not a language code; use ISO 639-1 codes as the lang column has them, "
                      f"e.g. en,de{hint}")



# Which phase each key feeds: a finished phase is re-run by `curate run` only when one of its
# keys changed (so a new threshold re-runs decide + write and downloads nothing).
_DECIDE_PREFIXES = ("dedup_", "negatives_", "decide_")
_DECIDE_KEYS = frozenset({"languages", "clip_threshold", "clip_thresholds_per_lang", "clip_keep_top_percent"})
_WRITE_KEYS = frozenset({"samples_per_shard", "ledger_rows_per_file"})
# CLIP outputs do not depend on the thread count; the error ceiling only judges finished outputs
_NO_PHASE_KEYS = frozenset({"output", "clip_cpu_threads", "max_internal_error_share", "max_download_failure_share"})


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


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               list: "a comma-separated list", dict: "a mapping like {en: 0.3}"}


def type_name(name: str) -> str:
    """The declared type of key `name`, in words."""
    hint = typing.get_type_hints(CurateConfig)[name]
    optional = typing.get_origin(hint) is typing.Union
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return _TYPE_NAMES[hint] + (" or null" if optional else "")


def _coerce(name: str, value: Any) -> Any:
    """Coerce a YAML value or a --set string to the declared type of field `name`."""
    hint = typing.get_type_hints(CurateConfig)[name]
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    wrong = ConfigError(f"{name} expects {type_name(name)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise wrong
    if hint is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, dict):
            raise wrong
        text = str(value).strip()
        if text.startswith("["):  # --set languages=[en, de]: YAML's list syntax
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                raise wrong from None
            if not isinstance(parsed, list):
                raise wrong
            return parsed
        return [part.strip() for part in text.split(",") if part.strip()] if text else []
    if hint is dict:
        if isinstance(value, dict):
            return dict(value)
        try:
            parsed = yaml.safe_load(str(value))  # accepts {en: 0.3, de: 0.25} or JSON
        except yaml.YAMLError:
            raise wrong from None
        if not isinstance(parsed, dict):
            raise wrong
        return parsed
    if isinstance(value, (bool, list, dict)) and hint is not str:  # YAML `retries: true` is not 1
        raise wrong
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise wrong
        try:
            return int(value) if not isinstance(value, str) else int(value.strip().replace("_", ""))
        except ValueError:
            raise wrong from None
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise wrong from None
        if number != number:  # NaN compares false with every threshold
            raise wrong
        return number
    if hint is str:
        if isinstance(value, (list, dict)):
            raise wrong
        return str(value)
    raise TypeError(f"unsupported config type for {name}: {hint}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r} in {source}" + did_you_mean(key, _FIELDS)
                       + "; `curate config` lists every key")


def read_config_file(path: str) -> dict:
    """A YAML mapping of config keys; one line naming the file when it is missing or broken."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path!r} is a folder; give a YAML file of config keys") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path!r} is not a text file; give a YAML file of config keys") from None
    except OSError as error:
        raise ConfigError(f"--config {path!r}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config {path!r} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path!r} must be a mapping of config keys (key: value lines), "
                          f"got a {type(loaded).__name__}")
    return loaded


def build_config(
    config_file: Optional[str] = None, overrides: Optional[list[str]] = None, **explicit: Any
) -> CurateConfig:
    """Defaults < YAML file < `--set key=value` overrides < explicit keyword arguments.
    Raises ConfigError (one line, naming the key or the file) on anything it cannot use."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        for key, value in read_config_file(config_file).items():
            values[str(key)] = value
            sources[str(key)] = f"--config {config_file}"
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set retries=1)")
        key, _, raw = item.partition("=")
        values[key.strip()] = raw
        sources[key.strip()] = "--set"
    values.update({k: v for k, v in explicit.items() if v is not None})
    for key in sorted(set(values) - set(_FIELDS)):
        raise _unknown_key_error(key, sources.get(key, "the arguments"))
    return CurateConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


# ---------------------------------------------------------------------------------------------
# What `curate config` prints: every key, its type, default, phase and one-line meaning
# ---------------------------------------------------------------------------------------------

KEY_HELP = {
    "input": "input path, glob or comma-separated list (the --input flag)",
    "output": "output folder (the --output flag)",
    "input_format": "input format; auto tells it from each file's extension",
    "url_col": "input column holding the image URL (the --url-col flag)",
    "caption_col": "input column holding the caption (the --caption-col flag)",
    "max_field_bytes": "longest CSV field read; a longer caption becomes caption_too_long",
    "max_in_flight": "concurrent HTTP requests per worker process",
    "per_host_concurrency": "concurrent requests to one host",
    "request_deadline_s": "seconds one attempt may take in all: connect, headers and body",
    "connect_timeout_s": "seconds to establish a connection",
    "retries": "extra attempts after a transient failure (timeout, connection error, 429, 5xx)",
    "backoff_base_s": "first retry delay; doubles each attempt, with jitter",
    "backoff_max_s": "longest retry delay",
    "max_retry_after_s": "longest Retry-After honoured; a longer one is not waited for",
    "max_body_bytes": "largest response body; larger ones are body_too_large",
    "max_redirects": "redirects followed before too_many_redirects",
    "user_agent": "User-Agent header sent with every request",
    "respect_robots_txt": "skip images whose host's robots.txt disallows us (robots_disallowed); honours Crawl-delay",
    "respect_tdmrep": "skip images whose site reserves text-and-data-mining rights by TDMRep (tdm_reserved)",
    "respect_content_usage": "skip images whose Content-Usage (IETF AIPREF) header or robots.txt rule refuses AI training (ai_usage_refused)",
    "robots_token": "our product token in robots.txt groups and X-Robots-Tag scopes (empty: user_agent's first name)",
    "policy_cache_hosts": "site origins whose policies a worker keeps cached (least recently used dropped)",
    "policy_ttl_s": "seconds a fetched robots.txt / tdmrep.json is used before it is fetched again",
    "policy_error_ttl_s": "seconds a site whose robots.txt failed (5xx, 429, unreachable) stays disallowed",
    "policy_max_bytes": "robots.txt and tdmrep.json are read up to this many bytes",
    "crawl_delay_max_s": "largest Crawl-delay honoured, in seconds between requests to one host",
    "resolve_hosts": "fixed addresses for host names, like curl --resolve; still checked by the SSRF guard",
    "respect_noai": "drop images served with X-Robots-Tag noai/noimageai (robots_noai)",
    "ssrf_guard": "refuse URLs that resolve to loopback/private/link-local addresses (ssrf_blocked)",
    "allow_hosts": "loopback host:port exceptions to the SSRF guard (the --allow-host flag; tests and demo only)",
    "max_pixels": "largest declared pixel count; more is decompression_bomb",
    "image_size": "side of the stored image after resizing",
    "resize_mode": "how images are resized: border (pad), keep_ratio, center_crop or no",
    "resize_only_if_bigger": "never upscale: resize only images larger than image_size",
    "encode_quality": "JPEG quality of re-encoded images",
    "min_image_size": "shortest original side kept; shorter is too_small",
    "max_aspect_ratio": "longest over shortest side kept; more is bad_aspect_ratio",
    "blank_std_threshold": "per-channel std dev of a 32x32 thumbnail below which an image is blank_image "
                           "unless it has ink (blank_ink_contrast, blank_min_ink_pixels)",
    "blank_ink_contrast": "levels a pixel must differ from the background colour (in some channel) to be ink",
    "blank_min_ink_pixels": "ink pixels touching other ink that keep a near-uniform image (strokes, text)",
    "min_caption_words": "fewest caption words kept; fewer is caption_too_short",
    "min_caption_chars": "fewest caption characters kept; fewer is caption_too_short",
    "max_caption_chars": "most caption characters kept; more is caption_too_long",
    "drop_boilerplate_captions": "drop captions that are file names, camera names, URLs or stock phrases",
    "languages": "ISO 639-1 codes to keep (e.g. en,de); empty keeps every language",
    "lang_min_score": "language-ID confidence below which lang is und",
    "langid_backend": "language ID: auto, fasttext, lingua, lingua_low, langdetect or none",
    "dedup_exact": "drop identical images (same sha256) as duplicate_exact",
    "dedup_near": "drop near-identical images (pHash + descriptor) as duplicate_near",
    "dedup_radius": "largest pHash Hamming distance of a near-duplicate candidate",
    "dedup_max_bucket": "band buckets larger than this are split again (counted, never truncated)",
    "dedup_mirror": "a horizontally flipped copy counts as a duplicate",
    "dedup_min_descriptor_similarity": "smallest thumbnail correlation of a near duplicate",
    "dedup_max_descriptor_distance": "largest thumbnail colour distance (0-255) of a near duplicate",
    "dedup_min_embedding_cosine": "smallest CLIP image cosine of a near duplicate (when both have one)",
    "clip_enabled": "compute CLIP embeddings and scores in the fetch phase",
    "clip_model": "open_clip architecture (e.g. ViT-B-32)",
    "clip_pretrained": "open_clip hub weights tag; ignored when clip_checkpoint is set",
    "clip_checkpoint": "local CLIP checkpoint file; wins over clip_pretrained",
    "clip_device": "auto (CUDA when present), cpu or cuda",
    "clip_deterministic_batches": "scores never depend on batching (byte-identical reruns)",
    "clip_precision": "auto, fp32, fp16, bf16 or int8",
    "clip_cpu_threads": "CPU inference threads per process (0: one per core)",
    "clip_min_batch_size": "fewest pairs per model call",
    "clip_max_batch_size": "most pairs per model call",
    "clip_threshold": "CLIP cosine below which a pair is low_clip_score",
    "clip_thresholds_per_lang": "per-language thresholds, e.g. {en: 0.28, de: 0.26}",
    "clip_keep_top_percent": "keep the top X% by CLIP score over the whole dataset; wins over thresholds",
    "dedup_exact_max": "up to this many samples near-dup candidates are searched over all of them; above it, within CLIP embedding groups",
    "dedup_candidates_per_sample": "in the grouped search, the closest candidates of a sample that are verified",
    "negatives_k": "image and text hard negatives mined per kept sample",
    "negatives_ceiling": "neighbours above this cosine are skipped as likely true positives",
    "negatives_exact_max": "up to this many kept samples the neighbour search is exact",
    "negatives_centroids": "k-means centroids of the partitioned search (0: from negatives_group_size)",
    "negatives_group_size": "target samples per centroid when negatives_centroids is 0",
    "negatives_probe": "centroid groups each sample is searched in",
    "negatives_sample": "k-means training sample size",
    "negatives_recall_queries": "sampled queries whose neighbours decide checks against exact search (recall estimate; 0: off)",
    "negatives_captions": "add rule-based one-edit caption negatives (swap, attribute, object)",
    "samples_per_shard": "samples per output shard",
    "raw_images_per_file": "images per raw tar of the fetch phase",
    "decide_partition_rows": "rows per partition of decide's spilled batches (bounds memory per step)",
    "ledger_rows_per_file": "rows per ledger and decisions Parquet file",
    "max_internal_error_share": "share of internal_error rows above which the run exits 4 (1 turns it off)",
    "max_download_failure_share": "share of failed downloads above which the run exits 4 (1 turns it off)",
}


def describe_keys() -> list[dict]:
    """Every config key: name, type, default, the phase it feeds, and its meaning."""
    defaults = CurateConfig()
    return [
        {"key": name, "type": type_name(name), "default": getattr(defaults, name),
         "phase": phase_of_key(name) or "-", "meaning": KEY_HELP.get(name, "")}
        for name in _FIELDS
    ]
