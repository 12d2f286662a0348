"""Download stage: polite, bounded, SSRF-safe HTTP fetching with many requests in flight.

Why this shape:
- One asyncio event loop per worker process (in a background thread) with one pooled aiohttp
  session: keep-alive connections are reused across elements and bundles, and hundreds of
  requests can be in flight on a 2-core worker without hundreds of threads.
- The SSRF check lives in the session's DNS resolver, so the address that was checked is the
  address that is connected to (no DNS-rebinding window); literal-IP URLs skip resolvers and are
  checked before each request. Redirects are followed by hand so every hop is checked again.
- The deadline covers connect + headers + body of one attempt, so a server that drips one byte a
  second costs at most `request_deadline_s`. The per-host semaphore is taken *before* the clock
  starts, so waiting for a politeness slot never counts as a timeout.
- Only transient failures (timeouts, connection errors, 429, 5xx) are retried, with exponential
  backoff and jitter, honouring Retry-After up to a cap.
- CPU work on the downloaded bytes (decoding, hashing) runs in a thread pool: Pillow releases the
  GIL while decoding and resizing, so it overlaps network I/O and uses every core of the worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import ipaddress
import logging
import os
import queue
import random
import re
import socket
import threading
import time
from typing import Callable, Iterable, Optional
from urllib.parse import urljoin, urlsplit

import aiohttp
import apache_beam as beam
from aiohttp.abc import AbstractResolver
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.config import CurateConfig, robots_product_token
from schemas import Col, DropReason
from transforms.base import DROPPED, KEPT, DropCounters, is_dropped, mark_dropped
from transforms.site_policy import POLICY_STATS, SitePolicies, origin_and_target

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NOAI_DIRECTIVES = frozenset({"noai", "noimageai"})
_BOT_NAME = re.compile(r"[a-z_*-][a-z0-9_.-]*")
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_CHUNK = 64 * 1024
# Rows (small dicts, no bodies yet) that may wait for their host's policy files beyond max_in_flight.
_MAX_ROWS_WAITING_FOR_POLICY = 4096
_WINDOW_RECHECK_S = 0.05
# Magic numbers of the formats the decode stage accepts; used to tell an image served with a
# wrong Content-Type from an HTML page before reading a large body.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class SsrfBlocked(OSError):
    """The target resolves to an address the SSRF guard refuses."""


# ---------------------------------------------------------------------------------------------
# Address policy
# ---------------------------------------------------------------------------------------------


def address_is_public(address: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 unwrapped first)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False
    return ip.is_global and not ip.is_multicast


def parse_allow_host(entry: str) -> tuple[str, int]:
    """'127.0.0.1:8000', 'localhost:8000' or '[::1]:8000' -> (host, port)."""
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--allow-host expects HOST:PORT, got {entry!r}")
    return host.strip("[]").lower(), int(port)


class HostPolicy:
    """Which (host, port, resolved address) triples a request may connect to."""

    def __init__(self, ssrf_guard: bool = True, allow_hosts: Iterable[str] = ()):
        self.ssrf_guard = ssrf_guard
        self.allowed = {parse_allow_host(entry) for entry in allow_hosts}

    def admits(self, host: str, port: int, address: str) -> bool:
        if not self.ssrf_guard or address_is_public(address):
            return True
        # The allow-list only ever opens loopback, and only for the exact host:port named.
        return (host.lower().strip("[]"), port) in self.allowed and ipaddress.ip_address(address).is_loopback


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, then drops every address the policy refuses.

    `fixed` answers some names without DNS (config `resolve_hosts`, like curl --resolve); those
    answers go through the same policy, so a name mapped to loopback still needs --allow-host."""

    def __init__(self, policy: HostPolicy, fixed: Optional[dict] = None):
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()
        self._fixed = {str(name).lower(): str(address) for name, address in (fixed or {}).items()}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        address = self._fixed.get(host.lower())
        if address is not None:
            ip = ipaddress.ip_address(address)
            infos = [{"hostname": host, "host": address, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                      "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET}]
        else:
            infos = await self._inner.resolve(host, port, family)
        admitted = [info for info in infos if self._policy.admits(host, port, info["host"])]
        if not admitted:
            refused = ", ".join(sorted({info["host"] for info in infos}))
            raise SsrfBlocked(f"{host} resolves to non-public address(es) {refused}")
        return admitted

    async def close(self) -> None:
        await self._inner.close()


# ---------------------------------------------------------------------------------------------
# One fetch
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FetchOutcome:
    body: Optional[bytes] = None
    reason: Optional[DropReason] = None
    detail: str = ""
    http_status: Optional[int] = None
    final_url: Optional[str] = None
    content_type: Optional[str] = None
    attempts: int = 0
    seconds: float = 0.0
    retry_after: Optional[float] = None
    transient: bool = False


def check_url(url: str, policy: HostPolicy) -> Optional[FetchOutcome]:
    """Refuse what can be refused without a network round trip."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return FetchOutcome(reason=DropReason.INVALID_URL, detail=str(error))
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return FetchOutcome(reason=DropReason.UNSUPPORTED_SCHEME, detail=f"scheme {parts.scheme!r}")
    host = parts.hostname
    if not host:
        return FetchOutcome(reason=DropReason.INVALID_URL, detail="no host")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: the resolver checks it
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    if not policy.admits(host, port, str(literal)):
        return FetchOutcome(reason=DropReason.SSRF_BLOCKED, detail=f"address {host} is not public")
    return None


def robots_forbid(values: list[str], product_token: str) -> bool:
    """X-Robots-Tag: 'noai' / 'noimageai' for every bot, or scoped: 'curate-bot: noai'. A scope
    ('otherbot: noindex, noai') covers the rest of its header value, as search engines read it."""
    for value in values:
        scope = None
        for part in value.split(","):
            part = part.strip().lower()
            head, sep, rest = part.partition(":")
            head = head.strip()
            if sep and rest.strip() and _BOT_NAME.fullmatch(head) and head not in _VALUED_DIRECTIVES:
                scope, part = head, rest.strip()
            if part in NOAI_DIRECTIVES and scope in (None, "*", product_token):
                return True
    return False


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _unwrap(error: BaseException) -> list[BaseException]:
    """The chain of causes of an exception (aiohttp wraps resolver errors)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = getattr(error, "os_error", None) or error.__cause__ or error.__context__
    return chain


def classify_exception(error: BaseException) -> FetchOutcome:
    chain = _unwrap(error)
    detail = f"{type(error).__name__}: {error}"[:300]
    if any(isinstance(e, SsrfBlocked) for e in chain):
        return FetchOutcome(reason=DropReason.SSRF_BLOCKED, detail=detail)
    if any(isinstance(e, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)) for e in chain):
        return FetchOutcome(reason=DropReason.TIMEOUT, detail=detail, transient=True)
    if any(isinstance(e, (socket.gaierror, aiohttp.ClientConnectorDNSError)) for e in chain):
        return FetchOutcome(reason=DropReason.DNS_ERROR, detail=detail)
    if any(isinstance(e, (aiohttp.InvalidURL, ValueError, UnicodeError)) for e in chain):
        return FetchOutcome(reason=DropReason.INVALID_URL, detail=detail)
    if any(isinstance(e, (aiohttp.ClientError, ConnectionError, OSError)) for e in chain):
        return FetchOutcome(reason=DropReason.CONNECTION_ERROR, detail=detail, transient=True)
    return FetchOutcome(reason=DropReason.INTERNAL_ERROR, detail=detail)


class Downloader:
    """Async HTTP client: one per worker process, used from its event loop only.

    Site policies (transforms/site_policy.py) are checked before a row takes a request slot: a row
    whose host's robots.txt is still on its way waits without holding one, so a stalled robots.txt
    never holds back the rows of other hosts. The policy files come through `fetch_policy_file`:
    this same session, SSRF guard, deadline and redirect checks, a smaller body cap.
    """

    def __init__(self, config: CurateConfig):
        self.config = config
        self.policy = HostPolicy(config.ssrf_guard, config.allow_hosts)
        self.product_token = robots_product_token(config)
        self.site_policies = SitePolicies(config, self.fetch_policy_file)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._slots = asyncio.Semaphore(config.max_in_flight)  # taken before the deadline starts
        self._session: Optional[aiohttp.ClientSession] = None

    async def open(self) -> "Downloader":
        connector = aiohttp.TCPConnector(
            limit=self.config.max_in_flight,
            limit_per_host=self.config.per_host_concurrency,
            resolver=GuardedResolver(self.policy, self.config.resolve_hosts),
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            headers={"User-Agent": self.config.user_agent, "Accept": "image/*,*/*;q=0.5"},
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry state between unrelated sites
            auto_decompress=True,
        )
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _slot(self, url: str) -> asyncio.Semaphore:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        slot = self._host_slots.get(host)
        if slot is None:
            slot = self._host_slots[host] = asyncio.Semaphore(self.config.per_host_concurrency)
        return slot

    async def fetch(self, url: str) -> FetchOutcome:
        started = time.monotonic()
        outcome = check_url(url, self.policy)
        origin = None  # set: the url's site policies apply (Crawl-delay included)
        if outcome is None and self.site_policies.active:
            origin_target = origin_and_target(url)
            origin = origin_target[0]
            refused = await self.site_policies.refusal_before_fetch(url, origin_target)
            if refused is not None:
                outcome = FetchOutcome(reason=refused.reason, detail=refused.detail, final_url=url)
        outcome, attempts = await self._with_retries(url, outcome, self._read, origin=origin)
        outcome.attempts = attempts
        outcome.seconds = time.monotonic() - started
        return outcome

    async def fetch_policy_file(self, url: str) -> FetchOutcome:
        """robots.txt or tdmrep.json: the same guarded path as an image, read up to `policy_max_bytes`."""
        outcome, attempts = await self._with_retries(url, check_url(url, self.policy), self._read_policy_file)
        outcome.attempts = attempts
        return outcome

    async def _with_retries(self, url: str, outcome: Optional[FetchOutcome], read, origin: Optional[str] = None):
        """Attempts until one is not transient or the retries are spent; `outcome` set: no attempt.
        With `origin`, each attempt keeps that origin's Crawl-delay and redirects meet site policies."""
        attempts = 0
        while outcome is None or (outcome.transient and attempts <= self.config.retries):
            if outcome is not None:  # a transient failure: back off, then try again
                backoff = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
                delay = backoff * random.uniform(0.5, 1.5)
                if outcome.retry_after is not None:
                    if outcome.retry_after > self.config.max_retry_after_s:
                        break  # the server asks for longer than we are willing to hold the row
                    delay = max(delay, outcome.retry_after)
                await asyncio.sleep(delay)
            if origin is not None:  # Crawl-delay of the row's own host
                refused = await self.site_policies.pace(origin)
                if refused is not None:
                    outcome = FetchOutcome(reason=refused.reason, detail=refused.detail, final_url=url)
                    break
            attempts += 1
            async with self._slot(url), self._slots:  # a row waiting for its host holds no global slot
                try:
                    async with asyncio.timeout(self.config.request_deadline_s):
                        outcome = await self._attempt(url, read, origin)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - classified into a reason, never raised
                    outcome = classify_exception(error)
        return outcome, attempts

    async def _attempt(self, url: str, read, checked_origin: Optional[str] = None) -> FetchOutcome:
        """One attempt, redirects followed by hand; with `checked_origin` (the url's, whose site
        policies fetch() checked), a hop to another origin meets that origin's policies first."""
        assert self._session is not None, "Downloader.open() was not awaited"
        visited: set[str] = set()
        current = url
        for _ in range(self.config.max_redirects + 1):
            refused = check_url(current, self.policy)
            if refused is not None:
                refused.final_url = current
                return refused
            if checked_origin is not None and current != url:
                hop_origin = origin_and_target(current)[0]
                if hop_origin != checked_origin:  # a redirect to another host
                    checked_origin = hop_origin
                    policy_refusal = await self.site_policies.refusal_before_fetch(current)
                    if policy_refusal is not None:
                        return FetchOutcome(reason=policy_refusal.reason, detail=policy_refusal.detail,
                                            final_url=current)
            async with self._session.get(current, allow_redirects=False) as response:
                status = response.status
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        return FetchOutcome(
                            reason=DropReason.HTTP_CLIENT_ERROR, detail="redirect without Location",
                            http_status=status, final_url=current,
                        )
                    visited.add(current)
                    current = urljoin(current, location)
                    if current in visited:
                        return FetchOutcome(
                            reason=DropReason.TOO_MANY_REDIRECTS, detail="redirect loop",
                            http_status=status, final_url=current,
                        )
                    continue
                return await read(response, current)
        return FetchOutcome(
            reason=DropReason.TOO_MANY_REDIRECTS,
            detail=f"more than {self.config.max_redirects} redirects", final_url=current,
        )

    @staticmethod
    def _transient_status(response: aiohttp.ClientResponse, base: dict) -> Optional[FetchOutcome]:
        status = response.status
        if status == 429 or status >= 500:
            return FetchOutcome(
                reason=DropReason.RATE_LIMITED if status == 429 else DropReason.HTTP_SERVER_ERROR,
                detail=f"HTTP {status}", transient=True,
                retry_after=parse_retry_after(response.headers.get("Retry-After")), **base,
            )
        return None

    async def _read_policy_file(self, response: aiohttp.ClientResponse, url: str) -> FetchOutcome:
        base = dict(http_status=response.status, final_url=url)
        transient = self._transient_status(response, base)
        if transient is not None:
            return transient
        # RFC 9309 2.5: parse at least 500 KiB; what lies past the cap is not read
        limit, chunks, received = self.config.policy_max_bytes, [], 0
        if 200 <= response.status < 300:
            async for chunk in response.content.iter_chunked(_CHUNK):
                chunks.append(chunk[: limit - received])
                received += len(chunks[-1])
                if received >= limit:
                    break
        return FetchOutcome(body=b"".join(chunks), **base)

    async def _read(self, response: aiohttp.ClientResponse, url: str) -> FetchOutcome:
        status = response.status
        content_type = response.headers.get("Content-Type", "")
        base = dict(http_status=status, final_url=url, content_type=content_type or None)
        transient = self._transient_status(response, base)
        if transient is not None:
            return transient
        if status >= 400 or status < 200 or status == 204:
            return FetchOutcome(reason=DropReason.HTTP_CLIENT_ERROR, detail=f"HTTP {status}", **base)
        if self.config.respect_noai and robots_forbid(
            response.headers.getall("X-Robots-Tag", []), self.product_token
        ):
            return FetchOutcome(reason=DropReason.ROBOTS_NOAI, detail="X-Robots-Tag", **base)
        refused = self.site_policies.refusal_of_response(response.headers)
        if refused is not None:
            return FetchOutcome(reason=refused.reason, detail=refused.detail, **base)
        limit = self.config.max_body_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            return FetchOutcome(reason=DropReason.BODY_TOO_LARGE, detail=f"Content-Length {declared}", **base)
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            if not chunks and content_type.lower().startswith("text/") and not chunk.startswith(_IMAGE_MAGIC):
                return FetchOutcome(reason=DropReason.NOT_AN_IMAGE, detail=f"Content-Type {content_type}", **base)
            received += len(chunk)
            if received > limit:
                return FetchOutcome(reason=DropReason.BODY_TOO_LARGE, detail=f"more than {limit} bytes", **base)
            chunks.append(chunk)
        return FetchOutcome(body=b"".join(chunks), **base)


def apply_fetch_outcome(record: dict, outcome: FetchOutcome) -> dict:
    record[Col.HTTP_STATUS] = outcome.http_status
    record[Col.FINAL_URL] = outcome.final_url
    record[Col.CONTENT_TYPE] = outcome.content_type
    record[Col.ATTEMPTS] = outcome.attempts
    record[Col.FETCH_SECONDS] = round(outcome.seconds, 4)
    if outcome.body is not None:
        record[Col.BYTES] = len(outcome.body)
        record[Col.IMAGE_BYTES] = outcome.body
    else:
        mark_dropped(record, outcome.reason or DropReason.INTERNAL_ERROR, outcome.detail)
    return record


# ---------------------------------------------------------------------------------------------
# Beam wiring
# ---------------------------------------------------------------------------------------------


class _FetchDoFn(beam.DoFn):
    """Keeps up to `max_in_flight` rows in flight; emits each as soon as it completes.

    Three threads share the work: the bundle thread (this DoFn's methods) hands rows to the event
    loop through an inbox, waking the loop once per batch of rows rather than once per row; the
    loop downloads, then gives each body to the CPU pool itself (the loop never waits for it); the
    pool decodes and puts the finished row on a completion queue, which the bundle thread drains
    in O(1) per row (no scan over every row in flight). Every row handed over comes back exactly
    once, a bug in any step included (as INTERNAL_ERROR).
    """

    def __init__(self, config: CurateConfig, postprocess: Optional[Callable[[dict], dict]]):
        self._config = config
        self._postprocess = postprocess
        self._in = Metrics.counter("fetch", "records_in")
        self._ok = Metrics.counter("fetch", "downloaded")
        self._bytes = Metrics.counter("fetch", "bytes_downloaded")
        self._drops = DropCounters("fetch")
        self._policy_counters = {name: Metrics.counter("policy", name) for name in POLICY_STATS}

    def setup(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="curate-fetch-loop", daemon=True)
        self._thread.start()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self._downloader = asyncio.run_coroutine_threadsafe(Downloader(self._config).open(), self._loop).result()
        self._inbox: collections.deque = collections.deque()  # rows for the loop to start
        self._wake_pending = False  # a call to _start_fetches is scheduled on the loop
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (record, downloaded) back to the bundle thread
        self._tasks: set = set()  # the loop keeps no strong reference to running tasks itself
        self._policy_reported = dict.fromkeys(POLICY_STATS, 0)  # what the Beam counters have so far

    def teardown(self):
        try:
            asyncio.run_coroutine_threadsafe(self._downloader.close(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self._outstanding = 0

    def _report_policy_stats(self) -> None:
        """The downloader's policy-file counts (kept on the loop thread) into Beam counters, which
        only count from the bundle thread."""
        stats = self._downloader.site_policies.stats
        for name, counter in self._policy_counters.items():
            value = stats[name]
            if value != self._policy_reported[name]:
                counter.inc(value - self._policy_reported[name])
                self._policy_reported[name] = value

    def _window_full(self) -> bool:
        """`max_in_flight` rows in flight; rows waiting for their host's robots.txt do not count (up
        to a bound), so a stalled robots.txt cannot fill the window and stall other hosts."""
        waiting = self._downloader.site_policies.waiting
        return (self._outstanding - waiting >= self._config.max_in_flight
                or self._outstanding >= self._config.max_in_flight + _MAX_ROWS_WAITING_FOR_POLICY)

    # --- pool thread ---------------------------------------------------------------------------
    def _run_postprocess(self, record: dict) -> dict:
        if self._postprocess is None or is_dropped(record):
            return record
        try:
            return self._postprocess(record)
        except Exception as error:  # noqa: BLE001 - one bad image costs one row
            log.warning("postprocess failed on %s: %s", record.get(Col.UID), error)
            return mark_dropped(record, DropReason.INTERNAL_ERROR, f"{type(error).__name__}: {error}")

    def _postprocess_and_finish(self, record: dict, downloaded: bool) -> None:
        try:
            record = self._run_postprocess(record)
        except BaseException as error:  # noqa: BLE001 - e.g. MemoryError: the row still comes back
            record = mark_dropped(record, DropReason.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        self._done.put((record, downloaded))

    # --- loop thread ---------------------------------------------------------------------------
    def _start_fetches(self) -> None:
        self._wake_pending = False  # before the inbox is read: a row added later wakes the loop again
        while self._inbox:
            task = self._loop.create_task(self._fetch_one(self._inbox.popleft()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch_one(self, record: dict) -> None:
        try:
            outcome = await self._downloader.fetch(record[Col.URL])
            apply_fetch_outcome(record, outcome)
        except Exception as error:  # noqa: BLE001 - a bug here must still give the row back
            log.warning("fetch failed on %s: %s", record.get(Col.UID), error)
            self._done.put((mark_dropped(record, DropReason.INTERNAL_ERROR, f"{type(error).__name__}: {error}"), False))
            return
        if outcome.body is None:
            self._done.put((record, True))
            return
        try:
            self._pool.submit(self._postprocess_and_finish, record, True)
        except RuntimeError as error:  # the pool is shut down (teardown raced a bundle)
            self._done.put((mark_dropped(record, DropReason.INTERNAL_ERROR, str(error)), True))

    # --- bundle thread -------------------------------------------------------------------------
    def _submit(self, record: dict) -> None:
        self._outstanding += 1
        if record.get(Col.IMAGE_BYTES) is not None:  # read from existing shards: nothing to fetch
            self._pool.submit(self._postprocess_and_finish, record, False)
            return
        self._inbox.append(record)
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._start_fetches)

    def _route(self, record: dict, downloaded: bool):
        if downloaded and record.get(Col.BYTES) is not None:  # a body came back
            self._ok.inc()
            self._bytes.inc(record[Col.BYTES])
        if is_dropped(record):
            record.pop(Col.IMAGE_BYTES, None)
            self._drops.inc(record[Col.REASON])
            return DROPPED, record
        return KEPT, record

    def _drain(self, block: bool):
        """The rows finished so far; with `block`, at least one (waiting for it), unless the window
        opens meanwhile (rows that begin to wait for their host's policy files leave it)."""
        while self._outstanding:
            try:
                record, downloaded = self._done.get(block=block, timeout=_WINDOW_RECHECK_S if block else None)
            except queue.Empty:
                if block and self._window_full():
                    continue
                return
            block = False
            self._outstanding -= 1
            yield self._route(record, downloaded)

    def process(self, record: dict):
        self._in.inc()
        if is_dropped(record):
            yield beam.pvalue.TaggedOutput(DROPPED, record)
            return
        self._submit(record)
        for tag, result in self._drain(block=self._window_full()):
            yield result if tag == KEPT else beam.pvalue.TaggedOutput(DROPPED, result)

    def finish_bundle(self):
        while self._outstanding:
            for tag, result in self._drain(block=True):
                value = WindowedValue(result, MIN_TIMESTAMP, [GlobalWindow()])
                yield value if tag == KEPT else beam.pvalue.TaggedOutput(DROPPED, value)
        self._report_policy_stats()


class FetchImages(beam.PTransform):
    """Records with a url (or with image bytes already, from shards) -> records with image bytes.

    `postprocess(record) -> record` runs on each successful body in the worker's thread pool
    (the pipeline passes decoding and hashing here so it overlaps the network). Returns a result
    with `.kept` and `.dropped`, like every stage.
    """

    def __init__(self, config: CurateConfig, postprocess: Optional[Callable[[dict], dict]] = None):
        super().__init__()
        self._config = config
        self._postprocess = postprocess

    def expand(self, records):
        return records | beam.ParDo(_FetchDoFn(self._config, self._postprocess)).with_outputs(DROPPED, main=KEPT)
