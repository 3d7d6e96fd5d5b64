"""On-disk cache of search results, shared safely by several processes.

Why sqlite (WAL mode) and not one file per key: a training run issues tens of thousands of
queries, many processes (one per host or per rollout worker) read and write at once, and
sqlite gives atomic writes, concurrent readers and TTL queries without a directory of tiny
files. WAL needs the processes to share one host's memory: on a network file system (NFS,
GCS fuse) give every host its own cache file.

Keys are (namespace, query, top_k); the namespace is chosen by the client and names the engine
and whatever else changes the answer (region/language for web engines, the server for the local
retriever). Values are JSON. Only successful results are stored: the caller decides, and
`search/clients.py` never stores a failure. A cache that cannot be read or written (disk full,
corrupt file) logs a warning and behaves as a miss: the search still happens.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

SEVEN_DAYS_S = 7 * 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    namespace TEXT NOT NULL,
    query TEXT NOT NULL,
    top_k INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, query, top_k)
)
"""


def default_cache_path() -> str:
    """$IGPO_SEARCH_CACHE, else ~/.cache/igpo_jax/search.sqlite."""
    return os.environ.get("IGPO_SEARCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "igpo_jax", "search.sqlite")


def _enable_wal(db: sqlite3.Connection, busy_timeout_s: float) -> None:
    """Switches a connection to WAL, retrying while another process holds the lock.

    Changing the journal mode needs an exclusive lock; when waiting for it could deadlock (two
    connections changing it at once), sqlite reports "database is locked" without going through
    its busy handler. Several processes opening a new cache together (the workers of one run)
    failed that way at random."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class SearchCache:
    """A (namespace, query, top_k) → JSON value store with a time-to-live.

    Thread-safe (one connection behind a lock; every statement is short) and process-safe
    (sqlite locking; a writer waits up to `busy_timeout_s` for another).
    """

    def __init__(self, path: str, ttl_s: float = SEVEN_DAYS_S, *, busy_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"cache ttl_s must be positive, got {ttl_s}")
        self.path = str(path)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        try:
            # isolation_level=None: autocommit, so that no transaction stays open between calls
            # and blocks writers in other processes.
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            _enable_wal(self._db, busy_timeout_s)
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable enough for a cache
            self._db.execute(_SCHEMA)
        except sqlite3.Error as error:
            raise RuntimeError(f"cannot open the search cache at {self.path}: {error}") from error

    def __repr__(self) -> str:
        return f"SearchCache(path={self.path!r}, ttl_s={self.ttl_s})"

    def get(self, namespace: str, query: str, top_k: int) -> Any | None:
        """The stored value if present and younger than the TTL, else None."""
        oldest = self._clock() - self.ttl_s
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT value FROM results WHERE namespace=? AND query=? AND top_k=? AND stored_at>=?",
                    (namespace, query, int(top_k), oldest)).fetchone()
            return None if row is None else json.loads(row[0])
        except (sqlite3.Error, ValueError) as error:
            logger.warning("search cache read failed (%s); treating as a miss", error)
            return None

    def put(self, namespace: str, query: str, top_k: int, value: Any) -> None:
        """Store (or refresh) a value; failures are logged, never raised."""
        try:
            payload = json.dumps(value, ensure_ascii=False)
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                                 (namespace, query, int(top_k), self._clock(), payload))
        except (sqlite3.Error, TypeError, ValueError) as error:
            logger.warning("search cache write failed (%s); result not cached", error)

    def purge_expired(self) -> int:
        """Delete entries older than the TTL; returns how many were deleted."""
        try:
            with self._lock:
                cursor = self._db.execute("DELETE FROM results WHERE stored_at<?",
                                          (self._clock() - self.ttl_s,))
            return cursor.rowcount
        except sqlite3.Error as error:
            logger.warning("search cache purge failed (%s)", error)
            return 0

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SearchCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
