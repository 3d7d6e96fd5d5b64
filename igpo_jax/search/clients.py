"""Search back-ends behind one async interface: Google (Serper), Bing v7, the local retriever, a mock.

    client = make_search_client("google")            # key from $SERPER_API_KEY
    results = await client.search(["q1", "q2"])      # one SearchResult per query, same order
    text = format_results(results, max_chars=4000)   # the tool message the model reads
    await client.close()

From synchronous code (a jitted sampling loop), wrap it: `BlockingSearchClient(client)`.

What a rollout can rely on:
- `search` never raises for back-end trouble. Timeouts, 429, 5xx, connection errors and
  malformed replies are retried with exponential backoff and jitter; after the last retry the
  query's SearchResult carries an `error` text instead of hits. Counters in `client.stats`.
- All queries of all concurrent `search` calls share one aiohttp session and one bound on
  requests in flight (`max_concurrency`); a query already in flight is not sent twice (the
  G rollouts of a group often ask the same first question).
- API keys never appear in repr, logs or error texts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

import aiohttp

from igpo_jax.search.cache import SEVEN_DAYS_S, SearchCache

logger = logging.getLogger(__name__)

ENGINES = ("google", "bing", "local", "mock")
MOCK_ENV = "IGPO_MOCK_SEARCH"
API_KEY_ENV = {"google": "SERPER_API_KEY", "bing": "BING_SEARCH_API_KEY"}
DEFAULT_BASE_URL = {"google": "https://google.serper.dev", "bing": "https://api.bing.microsoft.com",
                    "local": "http://127.0.0.1:8000"}


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SearchHit:
    """One retrieved page or document. `url` is the link for web engines, the doc id for local."""
    title: str
    snippet: str
    url: str = ""


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one query: hits, or (after all retries failed) an error text and no hits."""
    query: str
    hits: tuple[SearchHit, ...] = ()
    error: str | None = None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SearchStats:
    """Counters for metrics. Mutated only on the client's event loop.

    queries: queries asked; calls: HTTP requests sent (retries included); retries: requests
    that were repeats; failures: queries answered with an error; cache_hits: queries answered
    from the on-disk cache; shared: queries that joined an identical query already in flight.
    """
    queries: int = 0
    calls: int = 0
    retries: int = 0
    failures: int = 0
    cache_hits: int = 0
    shared: int = 0

    def as_metrics(self, prefix: str = "search/") -> dict[str, int]:
        return {prefix + name: value for name, value in dataclasses.asdict(self).items()}


class SearchClient(Protocol):
    """What the rollout talks to. Implementations: HttpSearchClient, MockSearchClient."""
    engine: str
    stats: SearchStats

    async def search(self, queries: Sequence[str]) -> list[SearchResult]: ...

    async def close(self) -> None: ...


# ----------------------------------------------------------------------------- options

class ApiKey:
    """An API key that cannot leak through repr/str/logging; `reveal()` is called only to build headers."""
    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not value:
            raise ValueError("empty API key")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """`text` with every occurrence of the key masked (for error texts quoting a reply body)."""
        return text.replace(self._value, "***")

    def __repr__(self) -> str:
        return "ApiKey(***)"

    __str__ = __repr__

    def __reduce__(self):  # keys are never pickled (checkpoints, multiprocessing)
        raise TypeError("API keys are not picklable; pass them through the environment")


@dataclass(frozen=True)
class SearchOptions:
    """Per-client settings. region/language map to Serper gl/hl and Bing mkt ("en-US")."""
    top_k: int = 10
    region: str = "us"
    language: str = "en"
    timeout_s: float = 20.0
    max_concurrency: int = 32

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": delay_i ∈ [d/2, d], d = min(max, base·2^i).

    Jitter spreads the retries of many rollouts that hit a 429 together; a server's
    Retry-After (seconds) is honoured up to `max_delay_s`.
    """
    max_retries: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self):
        if self.max_retries < 0 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"retry settings must be non-negative: {self}")

    def delay_s(self, retry_index: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** retry_index)
        delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_delay_s))
        return delay


# ----------------------------------------------------------------------------- engines

class MalformedReply(ValueError):
    """The back-end answered 200 with something that is not the documented shape."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold the key
    params: dict[str, str] | None = None
    json: Any = None


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedReply(message)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


@dataclass(frozen=True)
class SerperApi:
    """Google through Serper: POST {base}/search, header X-API-KEY, body {q, num, gl, hl}."""
    api_key: ApiKey = field(repr=False)
    base_url: str = DEFAULT_BASE_URL["google"]
    engine: str = "google"

    def request(self, query: str, options: SearchOptions) -> HttpRequest:
        return HttpRequest("POST", self.base_url.rstrip("/") + "/search",
                           headers={"X-API-KEY": self.api_key.reveal(), "Content-Type": "application/json"},
                           json={"q": query, "num": options.top_k, "gl": options.region, "hl": options.language})

    def parse(self, payload: Any, options: SearchOptions) -> tuple[SearchHit, ...]:
        _expect(isinstance(payload, dict), f"expected a JSON object, got {type(payload).__name__}")
        organic = payload.get("organic", [])  # absent when Google has no organic result
        _expect(isinstance(organic, list), "'organic' is not a list")
        _expect(all(isinstance(item, dict) for item in organic), "'organic' holds a non-object")
        return tuple(SearchHit(_text(item.get("title")), _text(item.get("snippet")), _text(item.get("link")))
                     for item in organic[:options.top_k])

    def cache_namespace(self, options: SearchOptions) -> str:
        return f"google|{options.region}|{options.language}"


@dataclass(frozen=True)
class BingApi:
    """Bing Web Search v7: GET {base}/v7.0/search?q=&count=&mkt=, header Ocp-Apim-Subscription-Key."""
    api_key: ApiKey = field(repr=False)
    base_url: str = DEFAULT_BASE_URL["bing"]
    engine: str = "bing"

    def request(self, query: str, options: SearchOptions) -> HttpRequest:
        return HttpRequest("GET", self.base_url.rstrip("/") + "/v7.0/search",
                           headers={"Ocp-Apim-Subscription-Key": self.api_key.reveal()},
                           params={"q": query, "count": str(options.top_k), "mkt": _bing_market(options)})

    def parse(self, payload: Any, options: SearchOptions) -> tuple[SearchHit, ...]:
        _expect(isinstance(payload, dict), f"expected a JSON object, got {type(payload).__name__}")
        pages = payload.get("webPages", {"value": []})  # absent when there are no web results
        _expect(isinstance(pages, dict) and isinstance(pages.get("value", []), list),
                "'webPages.value' is not a list")
        values = pages.get("value", [])
        _expect(all(isinstance(item, dict) for item in values), "'webPages.value' holds a non-object")
        return tuple(SearchHit(_text(item.get("name")), _text(item.get("snippet")), _text(item.get("url")))
                     for item in values[:options.top_k])

    def cache_namespace(self, options: SearchOptions) -> str:
        return f"bing|{_bing_market(options)}"


def _bing_market(options: SearchOptions) -> str:
    return f"{options.language}-{options.region.upper()}"


@dataclass(frozen=True)
class RetrieverApi:
    """The Search-R1 local retriever: POST {base}/retrieve {"queries", "topk", "return_scores"}."""
    base_url: str = DEFAULT_BASE_URL["local"]
    engine: str = "local"

    def request(self, query: str, options: SearchOptions) -> HttpRequest:
        return HttpRequest("POST", self.base_url.rstrip("/") + "/retrieve",
                           json={"queries": [query], "topk": options.top_k, "return_scores": True})

    def parse(self, payload: Any, options: SearchOptions) -> tuple[SearchHit, ...]:
        _expect(isinstance(payload, dict) and isinstance(payload.get("result"), list),
                "expected {\"result\": [[...]]}")
        _expect(len(payload["result"]) == 1 and isinstance(payload["result"][0], list),
                "expected one result list for one query")
        hits = []
        for item in payload["result"][0][:options.top_k]:
            # With return_scores the items are {"document": doc, "score": s}, else the doc itself.
            doc = item.get("document") if isinstance(item, dict) and "document" in item else item
            _expect(isinstance(doc, dict) and isinstance(doc.get("contents"), str),
                    "a document lacks string 'contents'")
            title, snippet = split_title(doc["contents"])
            hits.append(SearchHit(title, snippet, _text(doc.get("id"))))
        return tuple(hits)

    def cache_namespace(self, options: SearchOptions) -> str:
        return f"local|{self.base_url.rstrip('/')}"


def split_title(contents: str) -> tuple[str, str]:
    """Search-R1 contents '"Title"\\ntext' → (Title, text); no first line → ("", contents)."""
    first, newline, rest = contents.partition("\n")
    if not newline:
        return "", contents.strip()
    return first.strip().strip('"'), rest.strip()


# ----------------------------------------------------------------------------- HTTP client

@dataclass(frozen=True)
class _Failure:
    message: str
    retryable: bool
    retry_after_s: float | None = None


class HttpSearchClient:
    """Any engine above over HTTP: shared session, bounded concurrency, retries, cache, stats."""

    def __init__(self, api: SerperApi | BingApi | RetrieverApi, options: SearchOptions = SearchOptions(),
                 retry: RetryPolicy = RetryPolicy(), cache: SearchCache | None = None, *, seed: int | None = None):
        self.api = api
        self.engine = api.engine
        self.options = options
        self.retry = retry
        self.cache = cache
        self.stats = SearchStats()
        self._namespace = api.cache_namespace(options)
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight: dict[str, asyncio.Future] = {}

    def __repr__(self) -> str:  # the api's repr omits its key
        return (f"HttpSearchClient({self.api!r}, top_k={self.options.top_k}, "
                f"max_concurrency={self.options.max_concurrency}, cache={self.cache!r})")

    async def search(self, queries: Sequence[str]) -> list[SearchResult]:
        """One result per query, in order; all queries run concurrently within the client's bound."""
        if isinstance(queries, str):  # would otherwise search each character
            raise TypeError("search() takes a list of queries, not one string")
        self._bind_to_running_loop()
        return list(await asyncio.gather(*(self._search_one(query) for query in queries)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "HttpSearchClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _bind_to_running_loop(self) -> None:
        # An aiohttp session belongs to the loop it was made in; a second loop cannot reuse it.
        loop = asyncio.get_running_loop()
        if self._loop is None or (self._session is None and self._loop is not loop):
            self._loop = loop
            self._slots = asyncio.Semaphore(self.options.max_concurrency)
            self._in_flight = {}
        elif self._loop is not loop:
            raise RuntimeError("this search client is bound to the event loop it first ran in; close() it "
                               "there, or call it from synchronous code through BlockingSearchClient")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.options.max_concurrency)
            self._session = aiohttp.ClientSession(connector=connector)

    async def _search_one(self, query: str) -> SearchResult:
        self.stats.queries += 1
        query = " ".join(str(query).split())
        if not query:
            self.stats.failures += 1
            return SearchResult(query, error="empty query")
        if self.cache is not None:
            cached = self.cache.get(self._namespace, query, self.options.top_k)
            if cached is not None:
                self.stats.cache_hits += 1
                return SearchResult(query, tuple(SearchHit(*hit) for hit in cached), from_cache=True)
        pending = self._in_flight.get(query)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_with_retries(query))
            self._in_flight[query] = pending
            pending.add_done_callback(lambda _done, q=query: self._in_flight.pop(q, None))
        else:
            self.stats.shared += 1
        # shield: one cancelled waiter must not cancel the fetch that others are waiting on.
        return await asyncio.shield(pending)

    async def _fetch_with_retries(self, query: str) -> SearchResult:
        failure = None
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.retry.delay_s(attempt - 1, self._rng, failure.retry_after_s))
            outcome = await self._attempt(query)
            if not isinstance(outcome, _Failure):
                if self.cache is not None:
                    self.cache.put(self._namespace, query, self.options.top_k,
                                   [[hit.title, hit.snippet, hit.url] for hit in outcome])
                return SearchResult(query, outcome)
            failure = outcome
            logger.debug("%s search attempt %d for %r failed: %s", self.engine, attempt + 1, query, failure.message)
            if not failure.retryable:
                break
        self.stats.failures += 1
        error = f"{self.engine} search failed after {attempt + 1} attempt(s): {failure.message}"
        logger.warning("%s (query %r)", error, query[:200])
        return SearchResult(query, error=error)

    async def _attempt(self, query: str) -> tuple[SearchHit, ...] | _Failure:
        request = self.api.request(query, self.options)
        async with self._slots:
            self.stats.calls += 1
            try:
                async with self._session.request(
                        request.method, request.url, headers=request.headers, params=request.params,
                        json=request.json, timeout=aiohttp.ClientTimeout(total=self.options.timeout_s)) as reply:
                    body = await reply.read()
                    status, reason = reply.status, reply.reason or ""
                    retry_after = reply.headers.get("Retry-After")
            except asyncio.TimeoutError:
                return _Failure(f"timed out after {self.options.timeout_s:g} s", retryable=True)
            except aiohttp.ClientError as error:
                return _Failure(self._redact(f"connection error ({type(error).__name__}: {error})"), retryable=True)
        if status != 200:
            excerpt = body[:200].decode("utf-8", "replace").strip()
            message = self._redact(f"HTTP {status} {reason}" + (f": {excerpt}" if excerpt else ""))
            return _Failure(message, retryable=status in (408, 429) or status >= 500,
                            retry_after_s=_seconds(retry_after))
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return _Failure("malformed JSON in the reply", retryable=True)
        try:
            return self.api.parse(payload, self.options)
        except MalformedReply as error:
            return _Failure(f"unexpected reply shape ({error})", retryable=True)
        except Exception as error:  # a shape the checks missed is still the back-end's fault, not a crash
            logger.exception("%s reply could not be parsed", self.engine)
            return _Failure(f"unexpected reply shape ({type(error).__name__})", retryable=True)

    def _redact(self, text: str) -> str:
        key = getattr(self.api, "api_key", None)
        return key.redact(text) if key is not None else text


def _seconds(retry_after: str | None) -> float | None:
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else None
    except ValueError:  # an HTTP date: ignore it, the backoff applies
        return None


# ----------------------------------------------------------------------------- mock

class MockSearchClient:
    """Deterministic fake results from a hash of the query; no network. For tests and dry runs."""

    def __init__(self, options: SearchOptions = SearchOptions()):
        self.engine = "mock"
        self.options = options
        self.stats = SearchStats()

    def __repr__(self) -> str:
        return f"MockSearchClient(top_k={self.options.top_k})"

    async def search(self, queries: Sequence[str]) -> list[SearchResult]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not one string")
        return [self._answer(" ".join(str(query).split())) for query in queries]

    def _answer(self, query: str) -> SearchResult:
        self.stats.queries += 1
        if not query:
            self.stats.failures += 1
            return SearchResult(query, error="empty query")
        digest = hashlib.sha256(query.encode("utf-8")).hexdigest()
        hits = tuple(SearchHit(f"Mock page {i + 1} for {query}",
                               f"Mock snippet {digest[4 * i:4 * i + 8]} about {query}.",
                               f"mock://{digest[:12]}/{i + 1}")
                     for i in range(self.options.top_k))
        return SearchResult(query, hits)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "MockSearchClient":
        return self

    async def __aexit__(self, *exc) -> None:
        pass


# ----------------------------------------------------------------------------- factory

def mock_requested(mock: bool | None = None) -> bool:
    """An explicit flag wins; otherwise $IGPO_MOCK_SEARCH in {1, true, yes, on}."""
    if mock is not None:
        return bool(mock)
    return os.environ.get(MOCK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def make_search_client(engine: str, *, mock: bool | None = None, api_key: str | None = None,
                       base_url: str | None = None, top_k: int = 10, region: str = "us", language: str = "en",
                       timeout_s: float = 20.0, max_concurrency: int = 32, max_retries: int = 3,
                       backoff_base_s: float = 0.5, backoff_max_s: float = 8.0,
                       cache_path: str | None = None, cache_ttl_s: float = SEVEN_DAYS_S,
                       seed: int | None = None) -> HttpSearchClient | MockSearchClient:
    """A client for 'google' | 'bing' | 'local' | 'mock'.

    Mock mode (flag or $IGPO_MOCK_SEARCH) replaces any engine. Keys come from `api_key` or the
    environment ($SERPER_API_KEY, $BING_SEARCH_API_KEY); a missing key fails here, at start-up,
    not at the first search. `cache_path=None` disables the on-disk cache.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown search engine {engine!r}; expected one of {', '.join(ENGINES)}")
    options = SearchOptions(top_k=top_k, region=region, language=language, timeout_s=timeout_s,
                            max_concurrency=max_concurrency)
    if engine == "mock" or mock_requested(mock):
        return MockSearchClient(options)
    base_url = base_url or DEFAULT_BASE_URL[engine]
    if engine == "local":
        api = RetrieverApi(base_url)
    else:
        key = api_key or os.environ.get(API_KEY_ENV[engine], "")
        if not key:
            raise ValueError(f"search engine {engine!r} needs an API key: set ${API_KEY_ENV[engine]} "
                             f"or pass api_key (or use engine='mock' / ${MOCK_ENV}=true)")
        api = (SerperApi if engine == "google" else BingApi)(ApiKey(key), base_url)
    cache = SearchCache(cache_path, cache_ttl_s) if cache_path else None
    return HttpSearchClient(api, options, RetryPolicy(max_retries, backoff_base_s, backoff_max_s), cache, seed=seed)


# ----------------------------------------------------------------------------- tool-message text

def format_results(results: Sequence[SearchResult], *, max_chars: int = 6000,
                   measure: Callable[[str], int] = len, budget: int | None = None) -> str:
    """The tool-message text: per query a header, then numbered "title\\nsnippet" hits.

    The budget (`max_chars`, or `budget` in the units of `measure`, e.g. a tokenizer's token
    count) is split evenly between the queries so one query's long results cannot crowd out
    another's; hits past a query's share are dropped and the first one that does not fit is cut.
    """
    if not results:
        return "No search was run."
    total = max_chars if budget is None else budget
    separators = measure("\n\n") * (len(results) - 1)
    share = max(1, (total - separators) // len(results))
    return "\n\n".join(_format_one(result, share, measure) for result in results)


def _format_one(result: SearchResult, share: int, measure: Callable[[str], int]) -> str:
    if not result.ok:
        return _fit(f'Search for "{result.query}" failed: {result.error}', share, measure)
    if not result.hits:
        return _fit(f'No results for "{result.query}".', share, measure)
    block = _fit(f'Results for "{result.query}":', share, measure)
    for number, hit in enumerate(result.hits, start=1):
        entry = f"\n{number}. {hit.title}\n{hit.snippet}" if hit.title else f"\n{number}. {hit.snippet}"
        if measure(block + entry) <= share:
            block += entry
            continue
        cut = _longest_prefix_that_fits(block, entry, share, measure)
        if cut > len(f"\n{number}. ") + 20:  # a stub of a few words helps no one
            block += entry[:cut].rstrip() + "…"
        break
    return block


def _fit(text: str, share: int, measure: Callable[[str], int]) -> str:
    if measure(text) <= share:
        return text
    return text[:_longest_prefix_that_fits("", text, share, measure)].rstrip() + "…"


def _longest_prefix_that_fits(block: str, entry: str, share: int, measure: Callable[[str], int]) -> int:
    """Largest n with measure(block + entry[:n] + "…") <= share (binary search: few measure calls)."""
    low, high = 0, len(entry)
    while low < high:
        middle = (low + high + 1) // 2
        if measure(block + entry[:middle] + "…") <= share:
            low = middle
        else:
            high = middle - 1
    return low


# ----------------------------------------------------------------------------- synchronous callers

T = TypeVar("T")


class EventLoopThread:
    """A private asyncio loop on a daemon thread, for synchronous code that drives async clients
    or servers (`asyncio.run` per call would make a new loop and break the shared session)."""

    def __init__(self, name: str = "igpo-search-loop"):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T], timeout_s: float | None = None) -> T:
        """Run `coroutine` on the loop thread and wait for its result (its exception re-raised here)."""
        if not self._thread.is_alive():
            raise RuntimeError("the event loop thread is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


class BlockingSearchClient:
    """A SearchClient for synchronous callers; everything runs on one private loop thread.

    `search_many` runs the tool calls of a whole batch of rollouts concurrently, so a turn's
    searches cost about one call's latency.
    """

    def __init__(self, client: SearchClient):
        self.client = client
        self._loop_thread = EventLoopThread()

    def __repr__(self) -> str:
        return f"BlockingSearchClient({self.client!r})"

    @property
    def stats(self) -> SearchStats:
        return self.client.stats

    def search(self, queries: Sequence[str]) -> list[SearchResult]:
        return self._loop_thread.run(self.client.search(list(queries)))

    def search_many(self, batches: Sequence[Sequence[str]]) -> list[list[SearchResult]]:
        async def all_batches():
            return list(await asyncio.gather(*(self.client.search(list(batch)) for batch in batches)))
        return self._loop_thread.run(all_batches())

    def close(self) -> None:
        try:
            self._loop_thread.run(self.client.close())
        finally:
            self._loop_thread.close()

    def __enter__(self) -> "BlockingSearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
