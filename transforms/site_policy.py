"""Site policies: what the owner of an image's host says about crawling and AI use, honoured per host.

Four signals, each on by default with its own config key, each with its own drop reason:
- robots.txt of the image's own origin (scheme, host, port), RFC 9309 (`robots_disallowed`), and its
  `Crawl-delay` as a per-origin minimum interval between requests, up to `crawl_delay_max_s`;
- W3C TDMRep: a `tdm-reservation: 1` response header and `/.well-known/tdmrep.json` (`tdm_reserved`);
- IETF AIPREF: `Content-Usage` in a response header or a robots.txt group (`ai_usage_refused`);
- `X-Robots-Tag: noai` stays in the downloader (`robots_noai`, `respect_noai`), as before.

The policy files are fetched once per origin per worker through the downloader's own guarded client
(SSRF guard, deadline, redirects re-checked, body cap) and kept in a bounded LRU with a TTL. Rows of
an origin whose files are being fetched wait for that one request; rows of other origins never wait
for it. Everything here runs on the downloader's event loop thread only.

Rule matching of robots.txt is protego's (Scrapy's parser: longest match, Allow wins ties, `*`, `$`,
percent-encoding normalised). What protego lacks is written here: exact product-token group choice
(protego also applies a group named `curate` to `curate-bot`; RFC 9309 2.2.1 matches the token),
the AIPREF `Content-Usage` rule of a group, TDMRep and the header vocabularies.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
import re
import time
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

from protego import Protego

from pipeline.config import CurateConfig, robots_product_token
from schemas import DropReason

log = logging.getLogger(__name__)

ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"
# AIPREF categories from the most specific to the broadest. A dataset curated here may train
# generative models too, so our use is taken as the most specific one: the preference that decides
# is the first of these the site states (train-genai, else train-ai, else bots).
AI_USAGE_CATEGORIES = ("train-genai", "train-ai", "bots")
# Beam counters (namespace "policy") the fetch stage reports; created up front so the stats dict
# never changes size while the bundle thread reads it.
POLICY_STATS = (
    "robots_requests", "robots_cache_hits", "robots_bytes", "robots_unreachable",
    "tdmrep_requests", "tdmrep_cache_hits", "tdmrep_bytes",
    "crawl_delay_waits", "crawl_delay_wait_ms", "origins_evicted",
)
_UNRESERVED_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PRODUCT_TOKEN = re.compile(r"[A-Za-z_-]+")
_FIELD = re.compile(r"^\s*([A-Za-z-]+)\s*:(.*)$")
_OTHER_AGENTS = "other.agents"  # "." is never in a product token


def _agent_token(value: str) -> str:
    """A user-agent line's product token, lower case ('*' for all; 'CurateBot/1.0' -> 'curatebot')."""
    if value.startswith("*"):
        return "*"
    match = _PRODUCT_TOKEN.match(value)
    return match.group(0).lower() if match else _OTHER_AGENTS


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a row is not fetched (or not kept) because of a site's policy or its policy files."""

    reason: DropReason
    detail: str


# ---------------------------------------------------------------------------------------------
# Pure parsing and matching (no I/O)
# ---------------------------------------------------------------------------------------------


def origin_and_target(url: str) -> tuple[str, str]:
    """'https://Img.Example:443/a/b.jpg?x=1#f' -> ('https://img.example:443', '/a/b.jpg?x=1')."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{scheme}://{host}:{port}", target


def _normalise_escapes(text: str) -> str:
    """RFC 3986 6.2.2: decode escapes of unreserved characters, upper-case the others."""
    def fix(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char.isascii() and (char.isalnum() or char in "-._~") else "%" + match.group(1).upper()
    return _UNRESERVED_ESCAPE.sub(fix, text)


@functools.lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern:
    """A robots.txt-style path pattern (prefix match, `*` any run, a final `$` the end)."""
    anchored = pattern.endswith("$")
    body = _normalise_escapes(pattern[:-1] if anchored else pattern)
    return re.compile(".*".join(re.escape(part) for part in body.split("*")) + (r"\Z" if anchored else ""))


def _pattern_matches(pattern: str, target: str) -> bool:
    return _pattern_regex(pattern).match(_normalise_escapes(target) if "%" in target else target) is not None


def parse_usage_preferences(values: list[str]) -> dict[str, str]:
    """AIPREF usage preferences, a Structured Fields dictionary (RFC 9651) per value:
    'train-ai=n, search=y' -> {'train-ai': 'n', 'search': 'y'}. Later members override earlier
    ones, as for a dictionary split over several header lines; parameters are ignored."""
    preferences: dict[str, str] = {}
    for value in values:
        for member in value.split(","):
            key, sep, rest = member.partition("=")
            key = key.split(";", 1)[0].strip().lower()
            if key and sep:
                preferences[key] = rest.split(";", 1)[0].strip().strip('"').lower()
    return preferences


def ai_usage_refusal(preferences: dict[str, str]) -> Optional[str]:
    """'train-ai=n' when the preference that covers our use says no; None when it allows or is unstated."""
    for category in AI_USAGE_CATEGORIES:
        if category in preferences:
            return f"{category}=n" if preferences[category] == "n" else None
    return None


def tdm_header_refusal(reservation: Optional[str], policy: Optional[str]) -> Optional[str]:
    """TDMRep response headers: `tdm-reservation: 1` reserves (with `tdm-policy` naming the terms);
    0 does not, and any other value is a protocol error that counts as unset."""
    if reservation is None or reservation.strip() != "1":
        return None
    return "tdm-reservation: 1" + (f" (tdm-policy {policy.strip()[:200]})" if policy else "")


@dataclasses.dataclass
class RobotsRules:
    """One origin's robots.txt, read for one product token."""

    parser: Optional[Protego]  # None: no rules (a 4xx robots.txt: everything allowed)
    token: str
    crawl_delay: float = 0.0
    usage_rules: tuple = ()  # ((path pattern, preferences), ...) of the group that applies to us

    @classmethod
    def allow_all(cls, token: str) -> "RobotsRules":
        return cls(None, token)

    @classmethod
    def parse(cls, text: str, token: str) -> "RobotsRules":
        """RFC 9309 groups read by hand (exact token match, merged groups, Content-Usage), the
        Allow/Disallow matching by protego over a copy whose user-agent lines name only us or `*`."""
        groups: list[tuple[set, list]] = []  # (tokens, [(field, value)])
        rewritten: list[str] = []
        in_agents = False
        for line in text.splitlines():
            field = _FIELD.match(line.split("#", 1)[0])
            if not field:
                continue  # not a "field: value" line: nothing RFC 9309 reads
            name, value = field.group(1).lower(), field.group(2).strip()
            if name == "user-agent":
                agent = _agent_token(value)
                if not in_agents:
                    groups.append((set(), []))
                    in_agents = True
                groups[-1][0].add(agent)
                # protego would read a group `curate` as one of `curate-bot` too: other agents get a
                # name no product token contains
                rewritten.append(f"User-agent: {agent if agent in (token, '*') else _OTHER_AGENTS}")
                continue
            if name != "sitemap":  # sitemaps are not group members (RFC 9309 2.3.4)
                in_agents = False
            if groups:
                groups[-1][1].append((name, value))
            rewritten.append(line)
        ours = [rules for agents, rules in groups if token in agents] or [
            rules for agents, rules in groups if "*" in agents
        ]
        usage = []
        for rules in ours:
            for name, value in rules:
                if name == "content-usage" and value:
                    path, _, preferences = value.partition(" ") if value.startswith("/") else ("/", "", value)
                    usage.append((path, parse_usage_preferences([preferences])))
        parser = Protego.parse("\n".join(rewritten))
        delay = parser.crawl_delay(token) or 0.0
        return cls(parser, token, float(delay), tuple(usage))

    def refusal(self, url: str, target: str, content_usage: bool) -> Optional[Refusal]:
        if self.parser is None:
            return None
        if not self.parser.can_fetch(url, self.token):
            return Refusal(DropReason.ROBOTS_DISALLOWED, f"robots.txt disallows {self.token} here")
        if content_usage and self.usage_rules:
            # the most specific (longest) matching path decides, as for Allow/Disallow
            matching = [(len(path), preferences) for path, preferences in self.usage_rules
                        if _pattern_matches(path, target)]
            if matching:
                refused = ai_usage_refusal(max(matching, key=lambda m: m[0])[1])
                if refused:
                    return Refusal(DropReason.AI_USAGE_REFUSED, f"robots.txt Content-Usage: {refused}")
        return None


@dataclasses.dataclass
class TdmRules:
    """/.well-known/tdmrep.json: [{"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url}]."""

    rules: tuple = ()  # ((location, reserved, policy), ...) in file order

    @classmethod
    def parse(cls, body: bytes) -> "TdmRules":
        try:
            data = json.loads(body.decode("utf-8", errors="replace"))
        except ValueError:
            return cls()  # not a valid file: the protocol is not implemented (TDMRep 3.1)
        rules = []
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and isinstance(item.get("location"), str):
                reserved = str(item.get("tdm-reservation", "")).strip() == "1"
                rules.append((item["location"], reserved, str(item.get("tdm-policy") or "")[:200]))
        return cls(tuple(rules))

    def refusal(self, target: str) -> Optional[Refusal]:
        # TDMRep: "the most specific match is the first in sequence"
        for location, reserved, policy in self.rules:
            if _pattern_matches(location if location.startswith(("/", "*")) else "/" + location, target):
                if not reserved:
                    return None
                return Refusal(DropReason.TDM_RESERVED, f"tdmrep.json reserves {location}"
                               + (f" (tdm-policy {policy})" if policy else ""))
        return None


# ---------------------------------------------------------------------------------------------
# Per-worker cache and fetching
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Known:
    value: object  # RobotsRules | TdmRules | Refusal (the file was unreachable)
    expires: float


@dataclasses.dataclass
class _Origin:
    robots: object = None  # _Known | asyncio.Future | None
    tdmrep: object = None
    next_start: float = 0.0  # Crawl-delay: when the next request to this origin may start


# fetch(url) -> an object with .http_status, .body, .reason, .detail (the downloader's FetchOutcome)
PolicyFetcher = Callable[[str], Awaitable[object]]


class SitePolicies:
    """The per-worker policy cache and its checks. Used from one event loop only."""

    def __init__(self, config: CurateConfig, fetch_file: PolicyFetcher, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.token = robots_product_token(config)
        self._fetch_file = fetch_file
        self._clock = clock
        self._origins: collections.OrderedDict[str, _Origin] = collections.OrderedDict()
        self.stats = dict.fromkeys(POLICY_STATS, 0)
        self.waiting = 0  # rows waiting for an origin's policy files or its Crawl-delay right now

    @property
    def active(self) -> bool:
        return self.config.respect_robots_txt or self.config.respect_tdmrep

    def _origin(self, origin: str) -> _Origin:
        entry = self._origins.get(origin)
        if entry is None:
            entry = self._origins[origin] = _Origin()
            while len(self._origins) > self.config.policy_cache_hosts:
                self._origins.popitem(last=False)
                self.stats["origins_evicted"] += 1
        else:
            self._origins.move_to_end(origin)
        return entry

    def _lookup(self, entry: _Origin, kind: str, origin: str):
        """The cached value, or a future to await; starts the one fetch when nothing is cached."""
        slot = getattr(entry, kind)
        if isinstance(slot, _Known) and slot.expires > self._clock():
            self.stats[f"{kind}_cache_hits"] += 1
            return slot.value
        if isinstance(slot, asyncio.Future) and not slot.cancelled():  # cancelled: only at shutdown
            self.stats[f"{kind}_cache_hits"] += 1
            return slot
        self.stats[f"{kind}_requests"] += 1
        loader = self._load_robots if kind == "robots" else self._load_tdmrep
        future = asyncio.ensure_future(self._settle(entry, kind, loader(origin)))
        setattr(entry, kind, future)
        return future

    async def _settle(self, entry: _Origin, kind: str, loading: Awaitable[tuple[object, float]]):
        try:
            value, ttl = await loading
        except Exception as error:  # noqa: BLE001 - a bug here must not hang the rows waiting on it
            log.warning("%s fetch failed: %s", kind, error)
            value, ttl = Refusal(DropReason.INTERNAL_ERROR, f"{kind}: {type(error).__name__}: {error}"), 0.0
        setattr(entry, kind, _Known(value, self._clock() + ttl))
        return value

    async def _load_robots(self, origin: str) -> tuple[object, float]:
        outcome = await self._fetch_file(origin + ROBOTS_PATH)
        self.stats["robots_bytes"] += len(outcome.body or b"")
        status = outcome.http_status
        if outcome.reason is None and status is not None and 200 <= status < 300:
            text = (outcome.body or b"").decode("utf-8-sig", errors="replace")  # a BOM is not a field name
            return RobotsRules.parse(text, self.token), self.config.policy_ttl_s
        if status == 429 or (status or 0) >= 500:
            self.stats["robots_unreachable"] += 1
            return Refusal(DropReason.ROBOTS_DISALLOWED, f"robots.txt answered HTTP {status}: the site counts "
                           "as disallowed for a while (RFC 9309 2.3.1.3)"), self.config.policy_error_ttl_s
        if outcome.reason is not None and outcome.reason != DropReason.TOO_MANY_REDIRECTS:
            # unreachable: nothing of the site is fetched for a while; the row keeps the network
            # reason (dns_error, timeout, ...) so `--retry-failed` tries it again later
            self.stats["robots_unreachable"] += 1
            return Refusal(outcome.reason, f"robots.txt unreachable, site skipped: {outcome.detail}"[:300]), \
                self.config.policy_error_ttl_s
        # 4xx (or more redirects than followed, RFC 9309 2.3.1.2): no robots.txt, everything allowed
        return RobotsRules.allow_all(self.token), self.config.policy_ttl_s

    async def _load_tdmrep(self, origin: str) -> tuple[object, float]:
        outcome = await self._fetch_file(origin + TDMREP_PATH)
        self.stats["tdmrep_bytes"] += len(outcome.body or b"")
        status = outcome.http_status
        if outcome.reason is None and status is not None and 200 <= status < 300:
            return TdmRules.parse(outcome.body or b""), self.config.policy_ttl_s
        # no file, or none reachable: the site does not use this technique (TDMRep 3.1); asked again later
        ttl = self.config.policy_ttl_s if status is not None and 400 <= status < 500 else self.config.policy_error_ttl_s
        return TdmRules(), ttl

    async def refusal_before_fetch(self, url: str, origin_target: Optional[tuple[str, str]] = None) -> Optional[Refusal]:
        """robots.txt (and its Content-Usage) and tdmrep.json of the url's origin."""
        origin, target = origin_target or origin_and_target(url)
        entry = self._origin(origin)
        robots = self._lookup(entry, "robots", origin) if self.config.respect_robots_txt else None
        tdm = self._lookup(entry, "tdmrep", origin) if self.config.respect_tdmrep else None
        if isinstance(robots, asyncio.Future) or isinstance(tdm, asyncio.Future):
            self.waiting += 1
            try:  # shielded: a row cancelled while waiting must not cancel the origin's one fetch
                robots = await asyncio.shield(robots) if isinstance(robots, asyncio.Future) else robots
                tdm = await asyncio.shield(tdm) if isinstance(tdm, asyncio.Future) else tdm
            finally:
                self.waiting -= 1
        if isinstance(robots, Refusal):
            return robots
        if isinstance(robots, RobotsRules):
            refused = robots.refusal(url, target, self.config.respect_content_usage)
            if refused is not None:
                return refused
        if isinstance(tdm, TdmRules):
            return tdm.refusal(target)
        return None

    async def pace(self, origin: str) -> Optional[Refusal]:
        """Crawl-delay: requests to one origin start at least that far apart (up to the cap). A row
        that would wait longer than `max_retry_after_s` is not held (rate_limited, retried later)."""
        if not self.config.respect_robots_txt:
            return None
        entry = self._origins.get(origin)
        known = entry.robots if entry is not None else None
        rules = known.value if isinstance(known, _Known) else None
        delay = min(rules.crawl_delay, self.config.crawl_delay_max_s) if isinstance(rules, RobotsRules) else 0.0
        if delay <= 0:
            return None
        now = self._clock()
        start = max(now, entry.next_start)
        if start - now > self.config.max_retry_after_s:
            return Refusal(DropReason.RATE_LIMITED, f"robots.txt Crawl-delay {delay:g}s: this host's queue is "
                           f"longer than max_retry_after_s ({self.config.max_retry_after_s:g}s)")
        entry.next_start = start + delay
        if start > now:
            self.stats["crawl_delay_waits"] += 1
            self.stats["crawl_delay_wait_ms"] += int((start - now) * 1000)
            self.waiting += 1  # holds no request slot meanwhile
            try:
                await asyncio.sleep(start - now)
            finally:
                self.waiting -= 1
        return None

    def refusal_of_response(self, headers) -> Optional[Refusal]:
        """TDMRep and AIPREF response headers of a successful image response."""
        if self.config.respect_tdmrep:
            reserved = tdm_header_refusal(headers.get("tdm-reservation"), headers.get("tdm-policy"))
            if reserved:
                return Refusal(DropReason.TDM_RESERVED, reserved)
        if self.config.respect_content_usage:
            refused = ai_usage_refusal(parse_usage_preferences(headers.getall("Content-Usage", [])))
            if refused:
                return Refusal(DropReason.AI_USAGE_REFUSED, f"Content-Usage: {refused}")
        return None
