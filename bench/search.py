"""A turn's searches run concurrently: 32 calls to a retriever that takes 200 ms per call.

    python -m bench.search [--calls 32] [--latency_s 0.2] [--repeats 3]

The retriever is a stand-in for a slow back-end (Serper answers in ~0.2–1 s), served in-process
on 127.0.0.1 with the same /retrieve API as the real one, reached through the real client path
(make_search_client("local")). Reported: one call's latency, the calls made one after another
(serial_s), and all of them at once (wall_s). Target: ratio = wall_s / one call ≤ 1.5.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from aiohttp import web

from igpo_jax.search.clients import make_search_client
from igpo_jax.search.server import ServerThread


def slow_retriever(latency_s: float) -> web.Application:
    async def retrieve(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(latency_s)
        return web.json_response({"result": [[{"id": "0", "contents": f'"Doc"\nAbout {query}.'}]
                                             for query in body["queries"]]})

    app = web.Application()
    app.router.add_post("/retrieve", retrieve)
    return app


async def measure(url: str, calls: int, repeats: int) -> dict[str, float]:
    async with make_search_client("local", base_url=url, top_k=1, max_concurrency=calls, mock=False) as client:
        fresh = (f"query {i}" for i in range(10 ** 9))  # distinct queries: no in-flight sharing

        async def timed(queries) -> float:
            start = time.perf_counter()
            results = await client.search(queries)
            assert all(result.ok for result in results), results
            return time.perf_counter() - start

        await timed([next(fresh) for _ in range(calls)])  # warm-up: opens the pooled connections
        one_call_s = statistics.median([await timed([next(fresh)]) for _ in range(5)])
        serial_s = sum([await timed([next(fresh)]) for _ in range(calls)])
        wall_s = statistics.median([await timed([next(fresh) for _ in range(calls)]) for _ in range(repeats)])
        return {"one_call_s": one_call_s, "serial_s": serial_s, "wall_s": wall_s, "stats": client.stats.as_metrics()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--latency_s", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with ServerThread(slow_retriever(args.latency_s)) as server:
        figures = asyncio.run(measure(server.url, args.calls, args.repeats))
    result = {
        "bench": "search_turn", "calls": args.calls, "latency_s": args.latency_s,
        "one_call_s": round(figures["one_call_s"], 4), "serial_s": round(figures["serial_s"], 3),
        "wall_s": round(figures["wall_s"], 4),
        "ratio": round(figures["wall_s"] / figures["one_call_s"], 3),
        "speedup_vs_serial": round(figures["serial_s"] / figures["wall_s"], 1),
        "target_ratio": 1.5,
    }
    print(f"one call {result['one_call_s']} s; {args.calls} calls: serial {result['serial_s']} s, "
          f"concurrent {result['wall_s']} s = {result['ratio']} × one call ({result['speedup_vs_serial']}× faster)")
    print(f"client counters: {figures['stats']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
