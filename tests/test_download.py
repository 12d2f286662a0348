"""The downloader against a real HTTP server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import asyncio
import time

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import DEFAULT_USER_AGENT, build_config
from schemas import Col, DropReason, Status
from tests.conftest import in_process_pipeline
from transforms.download import (
    Downloader,
    FetchImages,
    HostPolicy,
    address_is_public,
    parse_retry_after,
    robots_forbid,
)


def fetch(config, url):
    async def go():
        downloader = await Downloader(config).open()
        try:
            return await downloader.fetch(url)
        finally:
            await downloader.close()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "address, public",
    [
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False),
        ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("240.0.0.1", False),
        ("93.184.216.34", True), ("2606:4700::1111", True),
    ],
)
def test_address_policy_is_computed_without_traffic(address, public):
    assert address_is_public(address) is public


def test_allow_list_opens_only_the_named_loopback_port():
    policy = HostPolicy(True, ["127.0.0.1:8000"])
    assert policy.admits("127.0.0.1", 8000, "127.0.0.1")
    assert not policy.admits("127.0.0.1", 8001, "127.0.0.1")
    assert not policy.admits("evil.example", 8000, "10.0.0.1")
    assert not HostPolicy(True, ["10.0.0.1:80"]).admits("10.0.0.1", 80, "10.0.0.1")  # never non-loopback
    assert HostPolicy(False).admits("x", 1, "10.0.0.1")


def test_robots_and_retry_after_parsing():
    assert robots_forbid(["noai"], "curate-bot")
    assert robots_forbid(["noindex, NoImageAI"], "curate-bot")
    assert robots_forbid(["curate-bot: noai"], "curate-bot")
    assert not robots_forbid(["otherbot: noai"], "curate-bot")
    assert not robots_forbid(["noindex, nofollow"], "curate-bot")
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("garbage") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9


def test_ok_fetch_carries_status_type_and_bytes(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/files/good_0000.jpg")
    assert outcome.reason is None and outcome.http_status == 200
    assert outcome.body[:3] == b"\xff\xd8\xff"
    assert outcome.content_type == "image/jpeg" and outcome.attempts == 1


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/status/404", DropReason.HTTP_CLIENT_ERROR),
        ("/status/403", DropReason.HTTP_CLIENT_ERROR),
        ("/html", DropReason.NOT_AN_IMAGE),
        ("/loop-a", DropReason.TOO_MANY_REDIRECTS),
        ("/noai/good_0000.jpg", DropReason.ROBOTS_NOAI),
        ("/huge", DropReason.BODY_TOO_LARGE),
        ("/huge-chunked", DropReason.BODY_TOO_LARGE),
        ("/redirect-out?port=9&to=good_0000.jpg", DropReason.SSRF_BLOCKED),
    ],
)
def test_permanent_failures_get_their_reason_without_retry(server, fast_config, path, reason):
    outcome = fetch(fast_config, server.base_url + path)
    assert outcome.reason == reason
    assert outcome.attempts == 1


def test_5xx_and_429_are_retried_then_reported(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/status/503")
    assert outcome.reason == DropReason.HTTP_SERVER_ERROR
    assert outcome.attempts == fast_config.retries + 1
    outcome = fetch(fast_config, f"{server.base_url}/status/429")
    assert outcome.reason == DropReason.RATE_LIMITED and outcome.attempts == fast_config.retries + 1


def test_retry_after_is_honoured_and_the_retry_succeeds(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/flaky/429/ra1?fail=1&after=1&to=good_0001.jpg")
    assert outcome.reason is None and outcome.attempts == 2
    assert outcome.seconds >= 1.0  # waited for Retry-After, not the 0.05 s backoff


def test_too_long_retry_after_is_not_waited_for(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/flaky/503/ra2?fail=5&after=3600&to=good_0001.jpg")
    assert outcome.reason == DropReason.HTTP_SERVER_ERROR and outcome.attempts == 1


def test_stalled_and_dripping_servers_end_at_the_deadline(server):
    config = build_config(overrides=["request_deadline_s=1", "retries=0"], allow_hosts=[server.allow])
    for path in ("/stall", "/drip"):
        started = time.monotonic()
        outcome = fetch(config, server.base_url + path)
        assert outcome.reason == DropReason.TIMEOUT
        assert time.monotonic() - started < 10  # bounded by the deadline, not by the server


def test_redirects_are_followed_and_recorded(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/redirect/3?to=good_0002.jpg")
    assert outcome.reason is None and outcome.final_url.endswith("/files/good_0002.jpg")
    limited = build_config(overrides=["max_redirects=1"], allow_hosts=[server.allow])
    assert fetch(limited, f"{server.base_url}/redirect/3?to=good_0002.jpg").reason == DropReason.TOO_MANY_REDIRECTS


def test_ssrf_guard_refuses_loopback_names_and_ips_not_allowed(server):
    guarded = build_config(overrides=["retries=0"])  # no allow-list at all
    assert fetch(guarded, f"{server.base_url}/files/good_0000.jpg").reason == DropReason.SSRF_BLOCKED
    assert fetch(guarded, f"http://localhost:{server.port}/files/good_0000.jpg").reason == DropReason.SSRF_BLOCKED
    assert fetch(guarded, "ftp://127.0.0.1/x").reason == DropReason.UNSUPPORTED_SCHEME


def test_wrong_content_type_with_image_bytes_is_accepted(server, fast_config):
    outcome = fetch(fast_config, f"{server.base_url}/files/good_0003.jpg?type=text/plain")
    assert outcome.reason is None and outcome.body[:3] == b"\xff\xd8\xff"


def _records(server, count, ms=300):
    return [
        {Col.UID: f"{i:032x}", Col.URL: f"{server.base_url}/slow/{i}?ms={ms}&to=good_{i % 40:04d}.jpg",
         Col.STATUS: Status.KEPT}
        for i in range(count)
    ]


def test_keeps_at_least_64_requests_in_flight_and_identifies_itself(server):
    config = build_config(overrides=["max_in_flight=128", "per_host_concurrency=128"], allow_hosts=[server.allow])
    server.stats(reset=True)
    with in_process_pipeline() as p:
        result = p | beam.Create(_records(server, 200)) | FetchImages(config)
        assert_that(result.kept | beam.combiners.Count.Globally(), equal_to([200]), label="all_fetched")
    stats = server.stats()
    assert stats["peak"] >= 64
    assert stats["user_agents"] == [DEFAULT_USER_AGENT]


def test_per_host_cap_bounds_concurrency(server):
    config = build_config(overrides=["max_in_flight=128", "per_host_concurrency=4"], allow_hosts=[server.allow])
    server.stats(reset=True)
    with in_process_pipeline() as p:
        result = p | beam.Create(_records(server, 40, ms=50)) | FetchImages(config)
        assert_that(result.dropped | beam.combiners.Count.Globally(), equal_to([0]), label="none_dropped")
    assert 1 <= server.stats()["peak"] <= 4
