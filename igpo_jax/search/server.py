"""The embedded retriever: BM25 (bm25s) over a JSONL corpus, speaking Search-R1's /retrieve API.

    python -m igpo_jax.search.server --corpus=wiki-18.jsonl --host=127.0.0.1 --port=8000 --topk=3

Corpus rows are {"id", "contents"} with contents '"Title"\\ntext' (Search-R1's wiki-18 format).
The index is built once and saved beside the corpus (FILE.jsonl.bm25s/) together with the byte
offset of every row; a later start reuses it while the corpus's size and mtime are unchanged.
Documents are read from the corpus through mmap, so a large corpus is not held in memory.

API (all replies JSON):
    POST /retrieve {"queries": [str, ...], "topk": int?, "return_scores": bool?}
         or        {"query": str, ...}                       (the verl-agent variant)
      → {"result": [[doc, ...], ...]}  or, with return_scores,
        {"result": [[{"document": doc, "score": float}, ...], ...]};  doc = {"id", "contents"}
    GET  /health → {"status": "ok", "documents": N}
A malformed request gets 400 {"error": "..."}; the server keeps serving.

In-process (tests, the training program): `with RetrieverServer.from_corpus(path) as server:`
runs it on a background thread and exposes `server.url`; clients reach it over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from aiohttp import web

from igpo_jax.search.clients import EventLoopThread

if TYPE_CHECKING:
    import bm25s
# bm25s is imported where it is used: it imports jax and runs a jax op at import time, and the
# standalone server first pins jax to the CPU (see main) so that it never grabs an accelerator.

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
STOPWORDS = "en"
MAX_QUERIES_PER_REQUEST = 1024
MAX_QUERY_CHARS = 4096
MAX_TOPK = 1000


# ----------------------------------------------------------------------------- index

def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


def _fingerprint(corpus: Path) -> dict[str, Any]:
    import bm25s

    stat = corpus.stat()
    return {"format": INDEX_FORMAT, "bm25s": bm25s.__version__,
            "stopwords": STOPWORDS, "corpus_bytes": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns}


def _scan_corpus(corpus: Path) -> tuple[np.ndarray, list[str]]:
    """Byte offsets of each document row (plus the end) and its contents; validates every row."""
    offsets, contents = [], []
    position = 0
    with open(corpus, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            start, position = position, position + len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{corpus}:{line_number}: not a JSON object ({error})") from None
            if not isinstance(row, dict) or not isinstance(row.get("contents"), str) or "id" not in row:
                raise ValueError(f"{corpus}:{line_number}: a row needs 'id' and a string 'contents'")
            offsets.append(start)
            contents.append(row["contents"])
    if not contents:
        raise ValueError(f"{corpus}: the corpus has no documents")
    offsets.append(position)
    return np.asarray(offsets, dtype=np.int64), contents


class Bm25Index:
    """BM25 over a JSONL corpus; documents are read back from the corpus file by offset."""

    def __init__(self, corpus: Path, retriever: bm25s.BM25, offsets: np.ndarray):
        self.corpus = corpus
        self._retriever = retriever
        self._offsets = offsets
        self._file = open(corpus, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def size(self) -> int:
        return len(self._offsets) - 1

    @classmethod
    def open(cls, corpus: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> "Bm25Index":
        """Load the saved index if it matches the corpus, else build it and try to save it."""
        import bm25s

        corpus = Path(corpus)
        if not corpus.is_file():
            raise FileNotFoundError(f"corpus file not found: {corpus}")
        index_dir = Path(index_dir) if index_dir else corpus.with_name(corpus.name + ".bm25s")
        fingerprint = _fingerprint(corpus)
        saved = _load_saved(index_dir, fingerprint)
        if saved is not None:
            logger.info("reusing the BM25 index at %s", index_dir)
            return cls(corpus, *saved)
        logger.info("building the BM25 index of %s", corpus)
        offsets, contents = _scan_corpus(corpus)
        retriever = bm25s.BM25()
        retriever.index(_tokenize(contents), show_progress=False)
        del contents
        _save(index_dir, retriever, offsets, fingerprint)
        return cls(corpus, retriever, offsets)

    def document(self, row: int) -> dict[str, Any]:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        doc = json.loads(self._map[start:end])
        return {"id": str(doc["id"]), "contents": doc["contents"]}

    def search(self, queries: Sequence[str], top_k: int) -> list[list[tuple[dict[str, Any], float]]]:
        """Top-k (doc, score) per query, best first; k is clamped to the corpus size."""
        k = min(top_k, self.size)
        # numpy top-k: bm25s would otherwise pick jax, i.e. the training process's accelerator.
        rows, scores = self._retriever.retrieve(_tokenize(queries), k=k, show_progress=False,
                                                backend_selection="numpy")
        return [[(self.document(int(row)), float(score)) for row, score in zip(rows_q, scores_q)]
                for rows_q, scores_q in zip(rows, scores)]

    def close(self) -> None:
        self._map.close()
        self._file.close()


def _load_saved(index_dir: Path, fingerprint: dict[str, Any]) -> tuple[bm25s.BM25, np.ndarray] | None:
    import bm25s

    try:
        if json.loads((index_dir / "fingerprint.json").read_text()) != fingerprint:
            return None
        return (bm25s.BM25.load(str(index_dir), show_progress=False),
                np.load(index_dir / "offsets.npy"))
    except (OSError, ValueError, KeyError):  # absent, partial or foreign: rebuild
        return None


def _save(index_dir: Path, retriever: bm25s.BM25, offsets: np.ndarray, fingerprint: dict[str, Any]) -> None:
    """Write into a temporary folder, then rename it into place, so readers never see half an index."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=".bm25s-", dir=index_dir.parent))
    except OSError as error:
        logger.warning("cannot save the BM25 index beside the corpus (%s); it will be rebuilt next time", error)
        return
    try:
        retriever.save(str(staging), show_progress=False)
        np.save(staging / "offsets.npy", offsets)
        (staging / "fingerprint.json").write_text(json.dumps(fingerprint))  # written last: marks completion
        if index_dir.exists():
            shutil.rmtree(index_dir, ignore_errors=True)
        os.replace(staging, index_dir)
    except OSError as error:  # e.g. another process saved the same index first
        logger.warning("could not save the BM25 index to %s (%s)", index_dir, error)
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- HTTP

class BadRequest(ValueError):
    """A request the server refuses with 400; the message tells the caller what to fix."""


def parse_retrieve_request(body: Any, default_topk: int) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) from a /retrieve body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if "queries" in body:
        queries = body["queries"]
        if not isinstance(queries, list) or not queries:
            raise BadRequest("'queries' must be a non-empty list of strings")
    elif "query" in body:
        queries = [body["query"]]
    else:
        raise BadRequest("the body needs 'queries' (a list of strings) or 'query' (a string)")
    if len(queries) > MAX_QUERIES_PER_REQUEST:
        raise BadRequest(f"at most {MAX_QUERIES_PER_REQUEST} queries per request, got {len(queries)}")
    if not all(isinstance(query, str) and query.strip() for query in queries):
        raise BadRequest("every query must be a non-empty string")
    if any(len(query) > MAX_QUERY_CHARS for query in queries):
        raise BadRequest(f"a query is longer than {MAX_QUERY_CHARS} characters")
    topk = body.get("topk", default_topk)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise BadRequest(f"'topk' must be an integer in [1, {MAX_TOPK}]")
    return_scores = body.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest("'return_scores' must be true or false")
    return queries, topk, return_scores


def make_app(index: Bm25Index, default_topk: int = 3) -> web.Application:
    """The aiohttp application; retrieval runs on one worker thread so the loop stays responsive."""
    retrieval_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bm25")

    async def retrieve(request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except ValueError:
            return _error(400, "the body is not valid JSON")
        try:
            queries, topk, return_scores = parse_retrieve_request(body, default_topk)
        except BadRequest as error:
            return _error(400, str(error))
        ranked = await asyncio.get_running_loop().run_in_executor(retrieval_thread, index.search, queries, topk)
        if return_scores:
            result = [[{"document": doc, "score": score} for doc, score in docs] for docs in ranked]
        else:
            result = [[doc for doc, _ in docs] for docs in ranked]
        return web.json_response({"result": result})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "documents": index.size})

    @web.middleware
    async def json_errors(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as error:  # 404, 405, 413 …: same JSON shape as our own errors
            return _error(error.status, error.reason)
        except Exception:  # a bug must cost one request, not the server
            logger.exception("retriever request failed")
            return _error(500, "internal error")

    async def shutdown(app: web.Application) -> None:
        retrieval_thread.shutdown(wait=False)

    app = web.Application(middlewares=[json_errors])
    app.router.add_post("/retrieve", retrieve)
    app.router.add_get("/health", health)
    app.on_shutdown.append(shutdown)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ----------------------------------------------------------------------------- in-process serving

class ServerThread:
    """Serves an aiohttp app on a background thread with its own loop; `port=0` picks a free port.

        with ServerThread(app) as server:
            requests.post(server.url + "/retrieve", ...)
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout_s: float = 1.0):
        self.app = app
        self.host = host
        self.port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._loop_thread: EventLoopThread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        if self._loop_thread is not None:
            raise RuntimeError("the server is already running")
        self._loop_thread = EventLoopThread(name=f"igpo-server-{self.host}")
        try:
            self.port = self._loop_thread.run(self._start_site())
        except BaseException:
            self._loop_thread.close()
            self._loop_thread = None
            raise
        return self

    async def _start_site(self) -> int:
        # a short shutdown_timeout: stop() should not wait a minute for a handler that hangs
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        return self._runner.addresses[0][1]  # the bound port, also when port 0 asked for any

    def stop(self) -> None:
        if self._loop_thread is None:
            return
        try:
            self._loop_thread.run(self._runner.cleanup())
        finally:
            self._loop_thread.close()
            self._loop_thread = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RetrieverServer(ServerThread):
    """The BM25 retriever on a background thread; `stop()` also closes the index."""

    def __init__(self, index: Bm25Index, host: str = "127.0.0.1", port: int = 0, default_topk: int = 3):
        super().__init__(make_app(index, default_topk), host, port)
        self.index = index

    @classmethod
    def from_corpus(cls, corpus: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                    default_topk: int = 3, index_dir: str | os.PathLike | None = None) -> "RetrieverServer":
        return cls(Bm25Index.open(corpus, index_dir), host, port, default_topk)

    def stop(self) -> None:
        super().stop()
        self.index.close()


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="JSONL file of {\"id\", \"contents\"} rows")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--topk", type=int, default=3, help="top-k when a request gives none")
    parser.add_argument("--index_dir", default=None, help="where the index is saved (default: CORPUS.bm25s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before bm25s imports jax: leave accelerators alone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    index = Bm25Index.open(args.corpus, args.index_dir)
    logger.info("serving %d documents on http://%s:%d", index.size, args.host, args.port)
    web.run_app(make_app(index, args.topk), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
