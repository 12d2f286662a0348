"""Site policies against a real aiohttp server on 127.0.0.1 playing many hosts (no mocks).

Host names are mapped to loopback with `resolve_hosts` and admitted with `allow_hosts`, so every
robots.txt, tdmrep.json and image goes through the downloader's guarded resolver and client.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that

from pipeline.config import build_config
from schemas import Col, DropReason, Status
from tests.conftest import in_process_pipeline
from tests.policy_server import PolicyServer, Site
from transforms.download import Downloader, FetchImages, robots_forbid
from transforms.site_policy import RobotsRules, TdmRules, ai_usage_refusal, parse_usage_preferences

R = DropReason
_names = (f"site{n}.test" for n in itertools.count())


@pytest.fixture(scope="module")
def sites():
    server = PolicyServer()
    yield server
    server.close()


def new_host(sites: PolicyServer, site: Site) -> str:
    host = next(_names)
    sites.sites[host] = site
    return host


def config_for(sites: PolicyServer, hosts, *overrides: str):
    return build_config(
        overrides=["request_deadline_s=3", "retries=0", "backoff_base_s=0.05", "connect_timeout_s=2", *overrides],
        **sites.config_overrides(hosts),
    )


def fetch_all(config, urls: list[str]):
    """Fetch urls concurrently with one downloader (one worker's cache); (outcomes, policy stats)."""
    async def go():
        downloader = await Downloader(config).open()
        try:
            return await asyncio.gather(*(downloader.fetch(u) for u in urls)), dict(downloader.site_policies.stats)
        finally:
            await downloader.close()
    return asyncio.run(go())


def reasons_for(sites, site: Site, paths: list[str], *overrides: str) -> list:
    host = new_host(sites, site)
    outcomes, _ = fetch_all(config_for(sites, [host], *overrides), [sites.url(host, p) for p in paths])
    return [o.reason for o in outcomes]


# ---------------------------------------------------------------------------------------------
# RFC 9309 rules, each case its own host with its own robots.txt
# ---------------------------------------------------------------------------------------------

RFC_CASES = [
    # (robots.txt, path, allowed?)
    ("User-agent: *\nDisallow: /a\n", "/a/x.jpg", False),
    ("User-agent: *\nDisallow: /a\n", "/b/x.jpg", True),
    ("User-agent: *\nDisallow: /\nAllow: /pub/\n", "/pub/x.jpg", True),  # longest match: Allow
    ("User-agent: *\nAllow: /pub\nDisallow: /pub/secret\n", "/pub/secret/x.jpg", False),  # longest: Disallow
    ("User-agent: *\nDisallow: /same\nAllow: /same\n", "/same/x.jpg", True),  # a tie: Allow wins
    ("User-agent: *\nDisallow: /*.gif$\n", "/x/pic.gif", False),  # wildcard + end anchor
    ("User-agent: *\nDisallow: /*.gif$\n", "/x/pic.gif?v=1", True),  # `$`: the url goes on
    ("User-agent: *\nDisallow: /*.gif$\n", "/x/pic.jpg", True),
    ("User-agent: *\nDisallow: /img/*/full\n", "/img/2024/full/x.jpg", False),  # inner wildcard
    ("User-agent: *\nDisallow: /exact$\n", "/exact", False),
    ("User-agent: *\nDisallow: /exact$\n", "/exactly.jpg", True),
    ("User-agent: *\nDisallow: /%7Ejoe/\n", "/~joe/x.jpg", False),  # percent-encoding normalised
    ("User-agent: *\nDisallow: /~joe/\n", "/%7Ejoe/x.jpg", False),
    ("User-agent: *\nDisallow: /p?q=1\n", "/p?q=1&r=2", False),  # the query is matched too
    ("User-agent: *\nDisallow:\n", "/x.jpg", True),  # an empty Disallow allows everything
    # user-agent groups: ours replaces `*`; matched case-insensitively on the product token
    ("User-agent: *\nDisallow: /\n\nUser-agent: curate-bot\nAllow: /\n", "/x.jpg", True),
    ("User-agent: *\nAllow: /\n\nUser-agent: Curate-Bot\nDisallow: /\n", "/x.jpg", False),
    ("User-agent: *\nAllow: /\n\nUser-agent: curate-bot/2.0\nDisallow: /\n", "/x.jpg", False),
    ("User-agent: *\nDisallow: /\n\nUser-agent: otherbot\nAllow: /\n", "/x.jpg", False),
    ("User-agent: otherbot\nDisallow: /\n", "/x.jpg", True),  # no group for us or `*`
    ("User-agent: curate\nDisallow: /\n", "/x.jpg", True),  # `curate` is another token, not a prefix of ours
    # several user-agent lines share one group; groups of our token are merged
    ("User-agent: otherbot\nUser-agent: curate-bot\nDisallow: /shared/\n", "/shared/x.jpg", False),
    ("User-agent: curate-bot\nDisallow: /one/\n\nUser-agent: *\nDisallow: /\n\nUser-agent: curate-bot\n"
     "Disallow: /two/\n", "/two/x.jpg", False),
    ("User-agent: curate-bot\nDisallow: /one/\n\nUser-agent: *\nDisallow: /\n\nUser-agent: curate-bot\n"
     "Disallow: /two/\n", "/three/x.jpg", True),
    ("# comment\nUser-agent: * # all\nDisallow: /c # trailing comment\nSitemap: http://x/s.xml\n", "/c/x.jpg", False),
    ("\ufeffUser-agent: *\r\nDisallow: /bom\r\n", "/bom/x.jpg", False),  # BOM and CRLF
]


@pytest.mark.parametrize("robots, path, allowed", RFC_CASES)
def test_rfc9309_rules_through_the_server(sites, robots, path, allowed):
    (reason,) = reasons_for(sites, Site(robots=robots), [path])
    assert reason == (None if allowed else R.ROBOTS_DISALLOWED), (robots, path)


def test_robots_token_can_be_set_or_derived_from_the_user_agent(sites):
    robots = "User-agent: *\nAllow: /\n\nUser-agent: picturebot\nDisallow: /\n"
    assert reasons_for(sites, Site(robots=robots), ["/x.jpg"], "robots_token=PictureBot") == [R.ROBOTS_DISALLOWED]
    assert reasons_for(sites, Site(robots=robots), ["/x.jpg"], "user_agent=PictureBot/1.0 (+https://x)") == [
        R.ROBOTS_DISALLOWED]
    with pytest.raises(ValueError, match="robots_token"):
        build_config(overrides=["user_agent=Mozilla5 compatible"])


@pytest.mark.parametrize("status, reason", [
    (404, None), (403, None), (401, None), (410, None),  # RFC 9309 2.3.1.3: unavailable, all allowed
    (500, R.ROBOTS_DISALLOWED), (503, R.ROBOTS_DISALLOWED), (429, R.ROBOTS_DISALLOWED),  # unreachable
])
def test_robots_status_4xx_allows_and_5xx_disallows(sites, status, reason):
    host = new_host(sites, Site(robots=status))
    outcomes, stats = fetch_all(config_for(sites, [host]), [sites.url(host, f"/x{i}.jpg") for i in range(3)])
    assert [o.reason for o in outcomes] == [reason] * 3
    assert len(sites.requests(host, "/robots.txt")) == 1 and stats["robots_requests"] == 1
    if reason is not None:
        assert "RFC 9309" in outcomes[0].detail and outcomes[0].attempts == 0
        assert not sites.requests(host, "/x0.jpg")  # nothing of a disallowed site is fetched


def test_unreachable_robots_is_asked_again_after_the_error_ttl(sites):
    host = new_host(sites, Site(robots=503))
    config = config_for(sites, [host], "policy_error_ttl_s=0")
    outcomes, stats = fetch_all(config, [sites.url(host, "/x.jpg")])
    assert outcomes[0].reason == R.ROBOTS_DISALLOWED

    async def twice():  # one worker: the second row comes after the first one's verdict expired
        downloader = await Downloader(config).open()
        try:
            first = await downloader.fetch(sites.url(host, "/a.jpg"))
            sites.sites[host].robots = "User-agent: *\nAllow: /\n"
            second = await downloader.fetch(sites.url(host, "/b.jpg"))
            return first, second, downloader.site_policies.stats["robots_requests"]
        finally:
            await downloader.close()
    first, second, requests = asyncio.run(twice())
    assert first.reason == R.ROBOTS_DISALLOWED and second.reason is None and requests == 2


def test_robots_timeout_gives_the_rows_a_timeout(sites):
    host = new_host(sites, Site(robots="stall"))
    started = time.monotonic()
    outcomes, stats = fetch_all(config_for(sites, [host], "request_deadline_s=1"), [sites.url(host, "/x.jpg")] * 2)
    assert [o.reason for o in outcomes] == [R.TIMEOUT, R.TIMEOUT]
    assert "robots.txt unreachable" in outcomes[0].detail and outcomes[0].attempts == 0
    assert time.monotonic() - started < 10
    assert stats["robots_requests"] == 1 and stats["robots_unreachable"] == 1


def test_robots_redirects_are_followed_and_rechecked(sites):
    target = new_host(sites, Site(robots="User-agent: *\nDisallow: /moved/\n"))
    same_host = Site(robots=("redirect", "/real-robots.txt"), files={"/real-robots.txt": "User-agent: *\nDisallow: /r/\n"})
    other_host = Site()
    forbidden = Site(robots=("redirect", "http://127.0.0.1:9/robots.txt"))  # loopback port not allowed
    looping = Site(robots=("redirect", "/robots.txt"))
    hosts = [new_host(sites, s) for s in (same_host, other_host, forbidden, looping)]
    other_host.robots = ("redirect", sites.url(target, "/robots.txt"))
    config = config_for(sites, hosts + [target])
    outcomes, _ = fetch_all(config, [sites.url(hosts[0], "/r/x.jpg"), sites.url(hosts[1], "/moved/x.jpg"),
                                     sites.url(hosts[1], "/kept/x.jpg"), sites.url(hosts[2], "/x.jpg"),
                                     sites.url(hosts[3], "/x.jpg")])
    assert [o.reason for o in outcomes] == [R.ROBOTS_DISALLOWED, R.ROBOTS_DISALLOWED, None, R.SSRF_BLOCKED,
                                            None]  # a redirect loop: no robots.txt, everything allowed
    assert "robots.txt unreachable" in outcomes[3].detail


def test_robots_body_is_read_up_to_the_cap(sites):
    padding = "# " + "x" * 1000 + "\n"
    early = "User-agent: *\nDisallow: /early/\n" + padding * 20 + "Disallow: /late/\n"
    host = new_host(sites, Site(robots=early))
    outcomes, stats = fetch_all(config_for(sites, [host], "policy_max_bytes=4096"),
                                [sites.url(host, "/early/x.jpg"), sites.url(host, "/late/x.jpg")])
    assert [o.reason for o in outcomes] == [R.ROBOTS_DISALLOWED, None]  # the rule past 4 KiB is not read
    assert stats["robots_bytes"] == 4096


def test_crawl_delay_spaces_requests_to_a_host_up_to_the_cap(sites):
    slow = new_host(sites, Site(robots="User-agent: *\nCrawl-delay: 0.4\n"))
    capped = new_host(sites, Site(robots="User-agent: *\nCrawl-delay: 1000\n"))
    config = config_for(sites, [slow, capped], "crawl_delay_max_s=0.3")
    outcomes, stats = fetch_all(config, [sites.url(h, f"/x{i}.jpg") for h in (slow, capped) for i in range(4)])
    assert all(o.reason is None for o in outcomes)
    for host in (slow, capped):
        starts = sorted(t for _, path, t in sites.requests(host) if path.startswith("/x"))
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert len(starts) == 4 and min(gaps) >= 0.25, (host, gaps)  # 0.3 s apart (0.4 s capped to 0.3)
    assert stats["crawl_delay_waits"] >= 6
    # a row that would wait longer than max_retry_after_s is not held
    many = new_host(sites, Site(robots="User-agent: *\nCrawl-delay: 5\n"))
    outcomes, _ = fetch_all(config_for(sites, [many], "max_retry_after_s=6"), [sites.url(many, f"/y{i}.jpg") for i in range(4)])
    assert sorted(str(o.reason) for o in outcomes).count(str(R.RATE_LIMITED)) == 2


# ---------------------------------------------------------------------------------------------
# TDMRep, AIPREF Content-Usage, X-Robots-Tag
# ---------------------------------------------------------------------------------------------


def test_tdm_reservation_header(sites):
    reasons = reasons_for(sites, Site(), ["/a.jpg?h=tdm-reservation:1", "/b.jpg?h=tdm-reservation:0",
                                          "/c.jpg?h=tdm-reservation:2", "/d.jpg"])
    assert reasons == [R.TDM_RESERVED, None, None, None]  # 2: a protocol error, counts as unset
    host = new_host(sites, Site())
    (outcome,), _ = fetch_all(config_for(sites, [host]),
                              [sites.url(host, "/p.jpg?h=tdm-reservation:1&h=tdm-policy:https://example.com/p.json")])
    assert outcome.reason == R.TDM_RESERVED and "https://example.com/p.json" in outcome.detail


def test_tdmrep_json_locations_first_match_wins(sites):
    tdmrep = ('[{"location": "/open/special/*", "tdm-reservation": 0},'
              ' {"location": "/open/*", "tdm-reservation": 1, "tdm-policy": "https://example.com/policy"},'
              ' {"location": "/*.png$", "tdm-reservation": 1}]')
    host = new_host(sites, Site(tdmrep=tdmrep))
    outcomes, stats = fetch_all(config_for(sites, [host]), [
        sites.url(host, p) for p in ("/open/x.jpg", "/open/special/x.jpg", "/closed/x.jpg", "/y/x.png",
                                     "/y/x.png?v=2")])
    assert [o.reason for o in outcomes] == [R.TDM_RESERVED, None, None, R.TDM_RESERVED, None]
    assert "https://example.com/policy" in outcomes[0].detail
    assert stats["tdmrep_requests"] == 1 and stats["tdmrep_cache_hits"] == 4
    assert reasons_for(sites, Site(tdmrep="{not json"), ["/x.jpg"]) == [None]  # an invalid file: no protocol


@pytest.mark.parametrize("values, reason", [
    (["train-ai=n"], R.AI_USAGE_REFUSED),
    (["train-ai=n, search=y"], R.AI_USAGE_REFUSED),
    (["train-genai=n"], R.AI_USAGE_REFUSED),
    (["bots=n"], R.AI_USAGE_REFUSED),
    (["bots=n, train-ai=y"], None),  # the more specific category decides
    (["train-ai=y"], None),
    (["search=n"], None),
    (["train-ai=y", "train-ai=n"], R.AI_USAGE_REFUSED),  # a later field line overrides
])
def test_content_usage_header(sites, values, reason):
    query = "&".join(f"h=Content-Usage:{v}" for v in values)
    assert reasons_for(sites, Site(), [f"/x.jpg?{query}"]) == [reason]


def test_content_usage_in_robots_txt(sites):
    robots = ("User-agent: *\nAllow: /\nContent-Usage: train-ai=n\nContent-Usage: /free/ train-ai=y\n\n"
              "User-agent: otherbot\nContent-Usage: train-ai=y\n")
    assert reasons_for(sites, Site(robots=robots), ["/x.jpg", "/free/x.jpg"]) == [R.AI_USAGE_REFUSED, None]
    ours = "User-agent: *\nContent-Usage: train-ai=n\n\nUser-agent: curate-bot\nAllow: /\n"
    assert reasons_for(sites, Site(robots=ours), ["/x.jpg"]) == [None]  # our group has no Content-Usage rule


def test_x_robots_tag_user_agent_scopes(sites):
    reasons = reasons_for(sites, Site(), [
        "/a.jpg?h=X-Robots-Tag:curate-bot: noai", "/b.jpg?h=X-Robots-Tag:otherbot: noindex, noai",
        "/c.jpg?h=X-Robots-Tag:noimageai", "/d.jpg?h=X-Robots-Tag:otherbot: noai&h=X-Robots-Tag:curate-bot: noindex"])
    assert reasons == [R.ROBOTS_NOAI, None, R.ROBOTS_NOAI, None]
    assert robots_forbid(["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "curate-bot")


def test_each_check_has_its_own_key_to_turn_it_off(sites):
    site = Site(robots="User-agent: *\nDisallow: /\nContent-Usage: train-ai=n\n",
                tdmrep='[{"location": "/", "tdm-reservation": 1}]')
    paths = ["/x.jpg?h=Content-Usage:train-ai=n&h=tdm-reservation:1&h=X-Robots-Tag:noai"]
    assert reasons_for(sites, site, paths) == [R.ROBOTS_DISALLOWED]
    assert reasons_for(sites, site, paths, "respect_robots_txt=false") == [R.TDM_RESERVED]  # tdmrep.json
    assert reasons_for(sites, site, paths, "respect_robots_txt=false", "respect_tdmrep=false") == [R.ROBOTS_NOAI]
    assert reasons_for(sites, site, paths, "respect_robots_txt=false", "respect_tdmrep=false",
                       "respect_noai=false") == [R.AI_USAGE_REFUSED]  # the header (robots.txt is not read)
    assert reasons_for(sites, Site(), paths, "respect_noai=false", "respect_content_usage=false") == [
        R.TDM_RESERVED]  # the header
    host = new_host(sites, site)
    outcomes, stats = fetch_all(
        config_for(sites, [host], "respect_robots_txt=false", "respect_noai=false", "respect_tdmrep=false",
                   "respect_content_usage=false"), [sites.url(host, paths[0])])
    assert outcomes[0].reason is None and outcomes[0].body[:3] == b"\xff\xd8\xff"
    assert not sites.requests(host, "/robots.txt") and not sites.requests(host, "/.well-known/tdmrep.json")


def test_redirect_to_another_host_checks_that_hosts_policies(sites):
    closed = new_host(sites, Site(robots="User-agent: *\nDisallow: /\n"))
    hop = new_host(sites, Site(files={"/go.jpg": ("redirect", "")}))
    sites.sites[hop].files["/go.jpg"] = ("redirect", sites.url(closed, "/x.jpg"))
    outcomes, _ = fetch_all(config_for(sites, [hop, closed]), [sites.url(hop, "/go.jpg")])
    assert outcomes[0].reason == R.ROBOTS_DISALLOWED and closed in outcomes[0].final_url
    assert not sites.requests(closed, "/x.jpg")


def test_mapped_names_still_pass_the_ssrf_guard(sites):
    host = new_host(sites, Site())
    config = build_config(overrides=["retries=0"], resolve_hosts={host: "127.0.0.1"})  # not allow-listed
    outcomes, _ = fetch_all(config, [sites.url(host, "/x.jpg")])
    assert outcomes[0].reason == R.SSRF_BLOCKED


# ---------------------------------------------------------------------------------------------
# The Beam stage: one request per host per worker, counters, a stalled host never holds others up
# ---------------------------------------------------------------------------------------------


def _records(urls):
    return [{Col.UID: f"{i:032x}", Col.URL: u, Col.STATUS: Status.KEPT} for i, u in enumerate(urls)]


def run_stage(config, urls, expect_kept, expect_dropped):
    """FetchImages over urls in a real Beam pipeline; `expect_*` check the sorted (url, reason)
    pairs of each output inside the pipeline. Returns the `policy` Beam counters."""
    pipeline = in_process_pipeline()
    fetched = pipeline | beam.Create(_records(urls), reshuffle=False) | FetchImages(config)
    for name, output, expect in (("kept", fetched.kept, expect_kept), ("dropped", fetched.dropped, expect_dropped)):
        pairs = output | f"{name}_pairs" >> beam.Map(lambda r: (r[Col.URL], r.get(Col.REASON)))
        assert_that(pairs, lambda got, expect=expect: expect(sorted(got)), label=f"check_{name}")
    result = pipeline.run()
    result.wait_until_finish()
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
            if c.key.metric.namespace == "policy"}


def _is(expected_pairs):
    expected = sorted(expected_pairs)

    def check(got):
        assert got == expected, (got[:5], expected[:5])
    return check


def test_one_robots_request_per_host_and_counted_hits(sites):
    robots = "User-agent: *\nDisallow: /private/\n"
    hosts = [new_host(sites, Site(robots=robots, tdmrep='[{"location": "/tdm/", "tdm-reservation": 1}]'))
             for _ in range(3)]
    urls = [sites.url(h, f"/{folder}/{i}.jpg") for i in range(10) for h in hosts for folder in ("ok", "private", "tdm")]
    reason_of = {"ok": None, "private": R.ROBOTS_DISALLOWED.value, "tdm": R.TDM_RESERVED.value}
    expected = [(u, reason_of[u.split("/")[3]]) for u in urls]
    counters = run_stage(config_for(sites, hosts), urls, _is([e for e in expected if e[1] is None]),
                         _is([e for e in expected if e[1] is not None]))
    for host in hosts:
        assert len(sites.requests(host, "/robots.txt")) == 1
        assert len(sites.requests(host, "/.well-known/tdmrep.json")) == 1
    assert counters["robots_requests"] == 3 and counters["robots_cache_hits"] == 87
    assert counters["tdmrep_requests"] == 3 and counters["tdmrep_cache_hits"] == 87
    assert counters["robots_bytes"] == 3 * len(robots)


def test_a_stalled_robots_txt_never_holds_up_other_hosts(sites):
    stalled = new_host(sites, Site(robots="stall"))
    others = [new_host(sites, Site(robots="User-agent: *\nAllow: /\n")) for _ in range(3)]
    # the stalled host's rows come first and outnumber the window (max_in_flight=4) many times over
    urls = [sites.url(stalled, f"/s{i}.jpg") for i in range(40)]
    urls += [sites.url(others[i % 3], f"/o{i}.jpg") for i in range(30)]
    config = config_for(sites, [stalled] + others, "max_in_flight=4", "request_deadline_s=4")
    counters = run_stage(config, urls, _is([(u, None) for u in urls[40:]]),
                         _is([(u, R.TIMEOUT.value) for u in urls[:40]]))
    (robots_asked,) = [t for _, _, t in sites.requests(stalled, "/robots.txt")]
    served = [t - robots_asked for host in others for _, path, t in sites.requests(host) if path.startswith("/o")]
    assert len(served) == 30 and max(served) < 3.5  # all served while that robots.txt stalled (4 s deadline)
    assert counters["robots_requests"] == 4 and counters["robots_unreachable"] == 1


# ---------------------------------------------------------------------------------------------
# Pure parsing (what the server cases above exercise end to end)
# ---------------------------------------------------------------------------------------------


def test_parsers_without_a_server():
    rules = RobotsRules.parse("User-agent: *\nCrawl-delay: 2.5\nContent-Usage: /a/ train-ai=n\n", "curate-bot")
    assert rules.crawl_delay == 2.5 and rules.usage_rules == (("/a/", {"train-ai": "n"}),)
    assert parse_usage_preferences(['train-ai=n;x=1, "bad", search=y']) == {"train-ai": "n", "search": "y"}
    assert ai_usage_refusal({"train-ai": "y", "train-genai": "n"}) == "train-genai=n"
    assert TdmRules.parse(b'[{"location": "/x", "tdm-reservation": "1"}, 5, {"no": 1}]').rules == (("/x", True, ""),)


# ---------------------------------------------------------------------------------------------
# Through `curate run` (the demo corpus has one row per signal): ledger, run/fetch.json, report
# ---------------------------------------------------------------------------------------------


def test_demo_run_reports_site_policies(demo_output):
    import json

    summary = json.loads((demo_output / "report" / "summary.json").read_text())
    policies = summary["site_policies"]
    refused = {c["reason"]: c["rows_refused"] for c in policies["checks"]}
    assert refused == {"robots_disallowed": 1, "tdm_reserved": 2, "ai_usage_refused": 1, "robots_noai": 1}
    assert all(c["on"] for c in policies["checks"])
    (host,) = policies["top_hosts"]
    assert host["host"] == "127.0.0.1" and host["rows_refused"] == 5 == policies["rows_refused"]
    assert host["reasons"] == {"tdm_reserved": 2, "ai_usage_refused": 1, "robots_disallowed": 1, "robots_noai": 1}
    fetch_info = json.loads((demo_output / "run" / "fetch.json").read_text())
    assert fetch_info["metrics"]["policy/robots_requests"] == policies["policy_fetches"]["robots_requests"] >= 1
    assert policies["policy_fetches"]["robots_cache_hits"] > 100 and policies["policy_fetches"]["robots_bytes"] > 0
    funnel_fetch = next(f for f in summary["funnel"] if f["stage"] == "fetch")
    assert funnel_fetch["reasons"]["robots_disallowed"] == 1
    page = (demo_output / "report" / "index.html").read_text()
    assert '<section id="policies"><h2>Site policies</h2>' in page and "respect_robots_txt" in page


def test_site_policy_figures_are_columnar_and_count_hosts():
    import pyarrow as pa

    from pipeline.report import site_policy_figures

    urls = ["http://A.example/x", "https://a.example:8443/y", "http://b.example/z", "http://[::1]:80/q",
            "javascript:alert(1)", "http://c.example/k"]
    reasons = ["robots_disallowed", "tdm_reserved", "ai_usage_refused", "robots_disallowed", "robots_disallowed",
               None]
    table = pa.table({Col.URL: urls, Col.REASON: reasons})
    figures = site_policy_figures(table, {"policy/robots_requests": 3, "fetch/downloaded": 9},
                                  {"respect_tdmrep": False})
    assert figures["rows_refused"] == 5 and figures["hosts_with_refusals"] == 4
    assert figures["top_hosts"][0] == {"host": "a.example", "rows_refused": 2,
                                       "reasons": {"robots_disallowed": 1, "tdm_reserved": 1}}
    assert {h["host"] for h in figures["top_hosts"]} == {"a.example", "b.example", "[::1]", "(none)"}
    assert [c["on"] for c in figures["checks"]] == [True, False, True, True]
    assert figures["policy_fetches"] == {"robots_requests": 3}
