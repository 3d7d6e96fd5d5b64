"""Search clients against scripted fake Serper / Bing / retriever servers on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import random
import sqlite3
import subprocess
import sys
import time

import pytest
from aiohttp import web

from igpo_jax.search.cache import SearchCache
from igpo_jax.search.clients import (ApiKey, BlockingSearchClient, RetryPolicy, SearchHit, SearchResult,
                                     format_results, make_search_client, split_title)
from igpo_jax.search.server import ServerThread

KEY = "sk-test-SECRET-0123456789abcdef"
FAST_RETRIES = dict(max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02)


class FakeSearchBackend:
    """Speaks Serper (/search), Bing (/v7.0/search) and the retriever (/retrieve).

    The query's first word picks the behaviour: busy (429 once, then fine), slow (answers after
    0.3 s), garbage (200 with HTML), shape (200 with JSON of the wrong shape), down (503 always),
    denied (401 echoing the key it received), wait (0.1 s, then fine); anything else: fine.
    """

    def __init__(self, retriever_scores: bool = True):
        self.hits = collections.Counter()
        self.requests = []
        self.in_flight = self.peak_in_flight = 0
        self.retriever_scores = retriever_scores
        app = web.Application()
        app.router.add_post("/search", self.handle)
        app.router.add_get("/v7.0/search", self.handle)
        app.router.add_post("/retrieve", self.handle)
        self.server = ServerThread(app)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.method == "POST" else {}
        query = body.get("q") or request.query.get("q") or (body.get("queries") or [""])[0]
        self.requests.append((request.method, request.path, dict(request.headers), dict(request.query), body))
        self.hits[query] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self.reply(request, query, body)
        finally:
            self.in_flight -= 1

    async def reply(self, request, query, body) -> web.Response:
        behaviour = query.split()[0] if query.split() else ""
        if behaviour == "busy" and self.hits[query] == 1:
            return web.json_response({"message": "rate limited"}, status=429, headers={"Retry-After": "0"})
        if behaviour == "slow":
            await asyncio.sleep(0.3)
        if behaviour == "wait":
            await asyncio.sleep(0.1)
        if behaviour == "garbage":
            return web.Response(text="<html>gateway hiccup</html>", content_type="text/html")
        if behaviour == "shape":
            return web.json_response({"organic": "nope", "webPages": {"value": 3}, "result": "nope"})
        if behaviour == "down":
            return web.Response(status=503, text="maintenance")
        if behaviour == "denied":
            received = request.headers.get("X-API-KEY") or request.headers.get("Ocp-Apim-Subscription-Key")
            return web.Response(status=401, text=f"invalid key {received}")
        if request.path == "/search":
            return web.json_response({"organic": [
                {"title": f"T{i} {query}", "link": f"https://example.org/{i}", "snippet": f"S{i} {query}"}
                for i in range(body["num"])]})
        if request.path == "/v7.0/search":
            count = int(request.query["count"])
            return web.json_response({"webPages": {"value": [
                {"name": f"T{i} {query}", "url": f"https://example.org/{i}", "snippet": f"S{i} {query}"}
                for i in range(count)]}})
        docs = [{"id": str(i), "contents": f'"T{i} {query}"\nS{i} {query}'} for i in range(body["topk"])]
        if self.retriever_scores:
            return web.json_response({"result": [[{"document": d, "score": 1.0 / (i + 1)} for i, d in enumerate(docs)]]})
        return web.json_response({"result": [docs]})


@pytest.fixture
def backend():
    fake = FakeSearchBackend()
    with fake.server:
        yield fake


def client_for(engine, backend, **overrides):
    options = dict(base_url=backend.server.url, top_k=2, timeout_s=2.0, **FAST_RETRIES)
    if engine != "local":
        options["api_key"] = KEY
    options.update(overrides)
    return make_search_client(engine, mock=False, **options)


def search(client, queries):
    """One event loop per test: search, then close the session."""
    async def go():
        async with client:
            return await client.search(queries)
    return asyncio.run(go())


# ----------------------------------------------------------------------------- requests and parsing

def test_serper_request_and_parsing(backend):
    client = client_for("google", backend, region="de", language="de")
    [result] = search(client, ["capital of France"])
    assert result == SearchResult("capital of France", (
        SearchHit("T0 capital of France", "S0 capital of France", "https://example.org/0"),
        SearchHit("T1 capital of France", "S1 capital of France", "https://example.org/1")))
    method, path, headers, _, body = backend.requests[0]
    assert (method, path, headers["X-API-KEY"]) == ("POST", "/search", KEY)
    assert body == {"q": "capital of France", "num": 2, "gl": "de", "hl": "de"}


def test_bing_request_and_parsing(backend):
    [result] = search(client_for("bing", backend, top_k=3), ["rivers of Europe"])
    assert [hit.title for hit in result.hits] == ["T0 rivers of Europe", "T1 rivers of Europe", "T2 rivers of Europe"]
    assert result.hits[0].url == "https://example.org/0" and result.hits[0].snippet == "S0 rivers of Europe"
    method, path, headers, params, _ = backend.requests[0]
    assert (method, path, headers["Ocp-Apim-Subscription-Key"]) == ("GET", "/v7.0/search", KEY)
    assert params == {"q": "rivers of Europe", "count": "3", "mkt": "en-US"}


@pytest.mark.parametrize("with_scores", [True, False])
def test_local_retriever_both_reply_forms(backend, with_scores):
    backend.retriever_scores = with_scores
    [result] = search(client_for("local", backend), ["who wrote Faust"])
    assert result.hits == (SearchHit("T0 who wrote Faust", "S0 who wrote Faust", "0"),
                           SearchHit("T1 who wrote Faust", "S1 who wrote Faust", "1"))
    assert backend.requests[0][4] == {"queries": ["who wrote Faust"], "topk": 2, "return_scores": True}


def test_split_title():
    assert split_title('"Paris"\nParis is the capital.') == ("Paris", "Paris is the capital.")
    assert split_title("no title line") == ("", "no title line")


def test_results_keep_query_order_and_whitespace_is_normalised(backend):
    results = search(client_for("google", backend), ["  b   query ", "a query", ""])
    assert [r.query for r in results] == ["b query", "a query", ""]
    assert results[2].error == "empty query" and backend.hits[""] == 0


# ----------------------------------------------------------------------------- failures

def test_429_then_success_after_one_retry(backend):
    client = client_for("google", backend)
    [result] = search(client, ["busy day"])
    assert result.ok and len(result.hits) == 2
    assert backend.hits["busy day"] == 2
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (2, 1, 0)


def test_timeout_becomes_error_text_after_retries(backend):
    client = client_for("bing", backend, timeout_s=0.05)
    start = time.perf_counter()
    [result] = search(client, ["slow site"])
    assert not result.ok and result.hits == ()
    assert "timed out after 0.05 s" in result.error and "after 3 attempt(s)" in result.error
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (3, 2, 1)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("query, message", [("garbage in", "malformed JSON"),
                                            ("shape shifter", "unexpected reply shape")])
@pytest.mark.parametrize("engine", ["google", "bing", "local"])
def test_malformed_replies_become_error_text(backend, engine, query, message):
    client = client_for(engine, backend)
    [result] = search(client, [query])
    assert not result.ok and message in result.error
    assert backend.hits[query] == 3 and client.stats.failures == 1


def test_server_errors_are_retried_client_errors_are_not(backend):
    client = client_for("google", backend)
    down, denied = search(client, ["down for good", "denied access"])
    assert "HTTP 503" in down.error and "maintenance" in down.error and backend.hits["down for good"] == 3
    assert "HTTP 401" in denied.error and backend.hits["denied access"] == 1


def test_unreachable_server_is_an_error_text():
    client = make_search_client("local", base_url="http://127.0.0.1:9", max_retries=1, backoff_base_s=0.01)
    [result] = search(client, ["anything"])
    assert not result.ok and "connection error" in result.error


def test_backoff_delays_grow_with_jitter_and_honour_retry_after():
    policy = RetryPolicy(max_retries=5, base_delay_s=1.0, max_delay_s=4.0)
    rng = random.Random(0)
    for retry_index, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)]:
        delays = [policy.delay_s(retry_index, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(set(delays)) > 1
    assert policy.delay_s(0, rng, retry_after_s=3.0) == 3.0
    assert policy.delay_s(0, rng, retry_after_s=60.0) == 4.0


# ----------------------------------------------------------------------------- concurrency

def test_queries_run_concurrently_within_the_bound(backend):
    queries = [f"wait {i}" for i in range(6)]
    wide = client_for("local", backend, max_concurrency=8)
    start = time.perf_counter()
    assert all(r.ok for r in search(wide, queries))
    assert time.perf_counter() - start < 0.25  # six 0.1 s calls ≈ one call's latency
    assert backend.peak_in_flight == 6

    backend.peak_in_flight = 0
    narrow = client_for("local", backend, max_concurrency=2)
    start = time.perf_counter()
    assert all(r.ok for r in search(narrow, [q + " again" for q in queries]))
    assert backend.peak_in_flight == 2 and time.perf_counter() - start >= 0.3


def test_identical_queries_in_flight_are_sent_once(backend):
    client = client_for("google", backend)

    async def two_rollouts():
        async with client:
            return await asyncio.gather(client.search(["wait same", "wait same"]), client.search(["wait same"]))

    first, second = asyncio.run(two_rollouts())
    assert first[0] == first[1] == second[0] and first[0].ok
    assert backend.hits["wait same"] == 1 and client.stats.shared == 2


def test_blocking_client_from_synchronous_code(backend):
    with BlockingSearchClient(client_for("local", backend)) as client:
        batches = client.search_many([["wait a"], ["wait b", "wait c"], []])
        again = client.search(["wait a"])  # same session, same loop: works a second time
    assert [[r.query for r in batch] for batch in batches] == [["wait a"], ["wait b", "wait c"], []]
    assert again[0].ok and client.stats.queries == 4


# ----------------------------------------------------------------------------- cache

def test_cache_hit_avoids_a_call_and_failures_are_not_cached(backend, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    first = client_for("google", backend, cache_path=path)
    search(first, ["paris facts", "down again"])
    second = client_for("google", backend, cache_path=path)  # a new client, as after a restart
    paris, down = search(second, ["paris facts", "down again"])
    assert paris.from_cache and paris.hits[0].title == "T0 paris facts"
    assert backend.hits["paris facts"] == 1 and second.stats.cache_hits == 1
    assert not down.ok and backend.hits["down again"] == 6  # retried both times, never cached


def test_cache_key_includes_engine_settings_and_top_k(backend, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    search(client_for("google", backend, cache_path=path, top_k=2), ["q"])
    search(client_for("google", backend, cache_path=path, top_k=3), ["q"])
    search(client_for("google", backend, cache_path=path, top_k=2, region="fr"), ["q"])
    search(client_for("bing", backend, cache_path=path, top_k=2), ["q"])
    assert backend.hits["q"] == 4


def test_cache_ttl_and_purge(tmp_path):
    now = [1000.0]
    with SearchCache(str(tmp_path / "c.sqlite"), ttl_s=10.0, clock=lambda: now[0]) as cache:
        cache.put("google|us|en", "q", 5, [["t", "s", "u"]])
        assert cache.get("google|us|en", "q", 5) == [["t", "s", "u"]]
        assert cache.get("google|us|en", "q", 6) is None
        now[0] += 11.0
        assert cache.get("google|us|en", "q", 5) is None
        assert cache.purge_expired() == 1 and len(cache) == 0


def test_unreadable_cache_degrades_to_a_miss(tmp_path, caplog):
    cache = SearchCache(str(tmp_path / "c.sqlite"))
    cache.close()  # every statement now fails with sqlite3.ProgrammingError
    assert cache.get("n", "q", 1) is None
    cache.put("n", "q", 1, [])
    assert "search cache read failed" in caplog.text and "search cache write failed" in caplog.text


_WRITER = """
import sys
from igpo_jax.search.cache import SearchCache
cache = SearchCache(sys.argv[1])
for i in range(200):
    cache.put("local|x", f"{sys.argv[2]}-{i}", 3, [["title", "snippet", str(i)]])
    assert cache.get("local|x", f"{sys.argv[2]}-{i}", 3) is not None
"""


def test_cache_is_shared_safely_by_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, path, name], env=env) for name in ("a", "b", "c")]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0, 0]
    with SearchCache(path) as cache:
        assert len(cache) == 600 and cache.get("local|x", "b-199", 3) == [["title", "snippet", "199"]]


# ----------------------------------------------------------------------------- keys

def test_keys_never_reach_logs_repr_or_errors(backend, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    client = client_for("google", backend, cache_path=str(tmp_path / "c.sqlite"))
    results = search(client, ["denied access", "down hard", "busy bee", "fine"])
    bing = client_for("bing", backend)
    results += search(bing, ["denied too"])
    assert "invalid key ***" in results[0].error  # the server echoed the key; we masked it
    texts = [caplog.text, repr(client), str(client), repr(client.api), repr(bing), format_results(results)]
    texts += [r.error or "" for r in results] + [repr(r) for r in results]
    assert all(KEY not in text for text in texts)
    assert "denied access" in caplog.text  # the log did record the failures, without the key
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(client.api)
    assert repr(ApiKey(KEY)) == str(ApiKey(KEY)) == "ApiKey(***)"


def test_key_comes_from_the_environment_or_fails_at_start(monkeypatch, backend):
    monkeypatch.delenv("IGPO_MOCK_SEARCH", raising=False)
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$SERPER_API_KEY"):
        make_search_client("google")
    monkeypatch.setenv("BING_SEARCH_API_KEY", KEY)
    [result] = search(make_search_client("bing", base_url=backend.server.url, top_k=1), ["env key"])
    assert result.ok and backend.requests[0][2]["Ocp-Apim-Subscription-Key"] == KEY
    with pytest.raises(ValueError, match="unknown search engine 'duckduckgo'"):
        make_search_client("duckduckgo")


# ----------------------------------------------------------------------------- mock

def test_mock_from_env_replaces_any_engine_without_key(monkeypatch):
    monkeypatch.setenv("IGPO_MOCK_SEARCH", "true")
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    client = make_search_client("google", top_k=3)
    first = search(client, ["a question", "another"])
    again = search(make_search_client("mock", top_k=3), ["a question"])
    assert client.engine == "mock" and len(first[0].hits) == 3 and first[0] == again[0]
    assert first[0].hits != first[1].hits and client.stats.queries == 2
    assert make_search_client("local", mock=False).engine == "local"  # an explicit flag wins


# ----------------------------------------------------------------------------- tool-message text

def hits(n, length=40):
    return tuple(SearchHit(f"Title {i}", f"snippet {i} " + "x" * length, f"u{i}") for i in range(n))


def test_format_results_numbers_title_and_snippet():
    text = format_results([SearchResult("q1", hits(2, 3)), SearchResult("q2", error="timed out"),
                           SearchResult("q3")])
    assert text == ('Results for "q1":\n1. Title 0\nsnippet 0 xxx\n2. Title 1\nsnippet 1 xxx\n\n'
                    'Search for "q2" failed: timed out\n\nNo results for "q3".')


def test_format_results_respects_the_budget_and_shares_it():
    results = [SearchResult("long", hits(10, 200)), SearchResult("short", hits(1, 10))]
    text = format_results(results, max_chars=700)
    assert len(text) <= 700
    assert 'Results for "short":\n1. Title 0' in text  # not crowded out by the long one
    assert text.count("\n1. ") == 2 and "…" in text
    words = format_results(results, measure=lambda s: len(s.split()), budget=60)
    assert len(words.split()) <= 60 and "short" in words


class _LockedFor:
    """A connection stand-in whose first `n` statements fail as sqlite does when another process
    holds the lock that changing the journal mode needs (it reports at once, without waiting)."""

    def __init__(self, n: int, message: str = "database is locked"):
        self.n, self.message, self.calls = n, message, 0

    def execute(self, statement):
        self.calls += 1
        if self.calls <= self.n:
            raise sqlite3.OperationalError(self.message)


def test_switching_to_wal_waits_out_another_process_holding_the_lock():
    from igpo_jax.search.cache import _enable_wal

    db = _LockedFor(3)
    _enable_wal(db, busy_timeout_s=5.0)
    assert db.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(_LockedFor(10**9), busy_timeout_s=0.1)  # gives up at the busy timeout
    other = _LockedFor(1, "disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _enable_wal(other, busy_timeout_s=5.0)
    assert other.calls == 1  # only a lock is worth waiting for
