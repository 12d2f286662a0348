"""The closed set of reasons a row can be dropped for.

Every stage that drops a row names one of these members; the ledger, the report and the tests
use the same enum, so a new reason is added here first (with its description) and nowhere else.
"""

from __future__ import annotations

import enum


class DropReason(str, enum.Enum):
    """Why an input row did not become a training sample. Values are the ledger's `reason` strings."""

    # --- input rows -------------------------------------------------------------------------
    MALFORMED_ROW = "malformed_row"
    MISSING_URL = "missing_url"
    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    DUPLICATE_ROW = "duplicate_row"

    # --- fetching ---------------------------------------------------------------------------
    SSRF_BLOCKED = "ssrf_blocked"
    DNS_ERROR = "dns_error"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    HTTP_CLIENT_ERROR = "http_client_error"
    HTTP_SERVER_ERROR = "http_server_error"
    RATE_LIMITED = "rate_limited"
    BODY_TOO_LARGE = "body_too_large"
    ROBOTS_NOAI = "robots_noai"
    NOT_AN_IMAGE = "not_an_image"
    SOURCE_MISSING_IMAGE = "source_missing_image"
    ROBOTS_DISALLOWED = "robots_disallowed"
    TDM_RESERVED = "tdm_reserved"
    AI_USAGE_REFUSED = "ai_usage_refused"

    # --- decoding and image rules -----------------------------------------------------------
    DECODE_ERROR = "decode_error"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    BAD_ASPECT_RATIO = "bad_aspect_ratio"
    BLANK_IMAGE = "blank_image"

    # --- captions ---------------------------------------------------------------------------
    CAPTION_TOO_SHORT = "caption_too_short"
    CAPTION_TOO_LONG = "caption_too_long"
    CAPTION_BOILERPLATE = "caption_boilerplate"
    LANGUAGE_NOT_WANTED = "language_not_wanted"

    # --- decide phase -----------------------------------------------------------------------
    DUPLICATE_EXACT = "duplicate_exact"
    DUPLICATE_NEAR = "duplicate_near"
    LOW_CLIP_SCORE = "low_clip_score"

    # --- anything a stage did not foresee: still one ledger row, never a crash -----------------
    INTERNAL_ERROR = "internal_error"

    @property
    def description(self) -> str:
        return REASON_DESCRIPTIONS[self]

    @property
    def is_transient(self) -> bool:
        """Failures worth fetching again later (`--retry-failed`)."""
        return self in TRANSIENT_REASONS


REASON_DESCRIPTIONS: dict[DropReason, str] = {
    DropReason.MALFORMED_ROW: "the input line or record could not be parsed",
    DropReason.MISSING_URL: "the url column is missing or empty",
    DropReason.INVALID_URL: "the url cannot be parsed or has no host",
    DropReason.UNSUPPORTED_SCHEME: "the url scheme is not http or https (file:, ftp:, data:, javascript:, ...)",
    DropReason.DUPLICATE_ROW: "another input row has the same url and caption (same uid)",
    DropReason.SSRF_BLOCKED: "the host resolves to a loopback/private/link-local/reserved address",
    DropReason.DNS_ERROR: "the host name does not resolve",
    DropReason.CONNECTION_ERROR: "the connection failed or was reset (after retries)",
    DropReason.TIMEOUT: "the request exceeded its total deadline (after retries)",
    DropReason.TOO_MANY_REDIRECTS: "more redirects than allowed, or a redirect loop",
    DropReason.HTTP_CLIENT_ERROR: "the server answered 4xx (other than 429)",
    DropReason.HTTP_SERVER_ERROR: "the server answered 5xx (after retries)",
    DropReason.RATE_LIMITED: "the server answered 429 (after retries)",
    DropReason.BODY_TOO_LARGE: "the body exceeds the byte limit (Content-Length or streamed)",
    DropReason.ROBOTS_NOAI: "X-Robots-Tag forbids AI use (noai / noimageai)",
    DropReason.NOT_AN_IMAGE: "the body is not a decodable image format (HTML, SVG, text, ...)",
    DropReason.SOURCE_MISSING_IMAGE: "a WebDataset input sample carries no image",
    DropReason.ROBOTS_DISALLOWED: "the image host's robots.txt disallows our user agent for this path "
    "(or answered 5xx/429: the site is treated as disallowed for a while, RFC 9309)",
    DropReason.TDM_RESERVED: "the rightsholder reserves text and data mining (W3C TDMRep: tdm-reservation "
    "header or /.well-known/tdmrep.json)",
    DropReason.AI_USAGE_REFUSED: "the site refuses AI training (IETF AIPREF Content-Usage header or "
    "robots.txt rule)",
    DropReason.DECODE_ERROR: "the image bytes are corrupt or truncated",
    DropReason.DECOMPRESSION_BOMB: "the header declares more pixels than allowed",
    DropReason.TOO_SMALL: "the image is smaller than the minimum side length",
    DropReason.BAD_ASPECT_RATIO: "the image is more elongated than the maximum aspect ratio",
    DropReason.BLANK_IMAGE: "the image is blank or near-uniform",
    DropReason.CAPTION_TOO_SHORT: "the caption has too few words or characters",
    DropReason.CAPTION_TOO_LONG: "the caption has too many characters",
    DropReason.CAPTION_BOILERPLATE: "the caption says nothing about the image (file name, 'untitled', bare URL, ...)",
    DropReason.LANGUAGE_NOT_WANTED: "the caption's language is not in the configured set",
    DropReason.DUPLICATE_EXACT: "identical image bytes (sha256) as a surviving sample",
    DropReason.DUPLICATE_NEAR: "a near-duplicate image (perceptual hash) of a surviving sample",
    DropReason.LOW_CLIP_SCORE: "the CLIP image-caption similarity is below the threshold",
    DropReason.INTERNAL_ERROR: "a stage raised an unexpected error on this row (see error_detail)",
}

TRANSIENT_REASONS = frozenset(
    {
        DropReason.CONNECTION_ERROR,
        DropReason.TIMEOUT,
        DropReason.HTTP_SERVER_ERROR,
        DropReason.RATE_LIMITED,
        DropReason.DNS_ERROR,
    }
)

# Reasons that say a download was tried and did not give an image (refusals included): the error
# ceiling's `max_download_failure_share` counts them over the rows that reached the download.
DOWNLOAD_FAILURE_REASONS = frozenset(
    {
        DropReason.SSRF_BLOCKED,
        DropReason.DNS_ERROR,
        DropReason.CONNECTION_ERROR,
        DropReason.TIMEOUT,
        DropReason.TOO_MANY_REDIRECTS,
        DropReason.HTTP_CLIENT_ERROR,
        DropReason.HTTP_SERVER_ERROR,
        DropReason.RATE_LIMITED,
        DropReason.BODY_TOO_LARGE,
        DropReason.ROBOTS_NOAI,
        DropReason.NOT_AN_IMAGE,
    }
)

# Rows dropped before anything is downloaded (input parsing and caption rules).
BEFORE_DOWNLOAD_REASONS = frozenset(
    {
        DropReason.MALFORMED_ROW,
        DropReason.MISSING_URL,
        DropReason.INVALID_URL,
        DropReason.UNSUPPORTED_SCHEME,
        DropReason.DUPLICATE_ROW,
        DropReason.CAPTION_TOO_SHORT,
        DropReason.CAPTION_TOO_LONG,
        DropReason.CAPTION_BOILERPLATE,
    }
)

assert set(REASON_DESCRIPTIONS) == set(DropReason), "every DropReason needs a description"
