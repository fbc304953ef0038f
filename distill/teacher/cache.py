"""The request cache: every successful response is committed here before it is counted as done.

The cache key is the teacher's identity and the request: model, messages, sampling params,
sample index and the API route (see `distill.teacher.client.cache_key`), never the API key
and, by default, not the endpoint address, so moving the same model to another host or port
pays nothing again (`generation.cache_key_endpoint` puts the address back in). A re-run, or
a resume after the process was killed, sends no request that already has a stored response.

Backends, one row per request:
- SQLite (the default, `generation.cache_path`), in WAL mode;
- PostgreSQL (`generation.cache_url: postgresql://...`, through psycopg 3), one cache shared by
  several workers on several machines.

Migration: a cache written while the key still held the endpoint address is marked `legacy`
when it is first opened; a miss is then looked up under its old key as well and copied under
the new one, so no stored answer is bought again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from distill.config import ConfigError

CHUNK = 500  # keys per lookup statement: under SQLite's bound-parameter cap, and a bounded batch of rows

SCHEMA = ("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL)",
          "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, keys TEXT NOT NULL, "
          "status TEXT NOT NULL, created REAL NOT NULL)",
          "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
KEY_FORMAT = "identity-v2"  # keys without the endpoint address (see the module doc)


def is_url(location: str | Path | None) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://", "postgresql+psycopg://"))


class ResponseCache:
    """Store of successful teacher responses, one committed row per response.

    SQLite in WAL mode: a commit is in the OS before `put` returns, so a SIGKILL loses only
    requests still in flight, never a stored response. PostgreSQL commits the same way.
    """

    def __init__(self, location: str | Path):
        """Args: location: a SQLite file path, or a `postgresql://` URL."""
        self.pg = is_url(location)
        self.where = _safe_url(str(location)) if self.pg else str(location)
        self.path = None if self.pg else Path(location)
        self.conn = self._connect_pg(str(location)) if self.pg else self._connect_sqlite()
        self.legacy = self._key_format() != KEY_FORMAT

    def _connect_sqlite(self):
        from distill.data import locked_beside

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One opener at a time: switching a new file to WAL takes a lock that SQLite does not wait
            # for, so shard workers opening a fresh cache together got "database is locked" at once.
            with locked_beside(self.path):
                conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                fresh = not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'responses'").fetchone()
                for statement in SCHEMA:
                    conn.execute(statement)
                if fresh:
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('key_format', ?)", (KEY_FORMAT,))
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path}: cannot open the request cache ({e}) (generation.cache_path)") from None
        return conn

    def _connect_pg(self, url: str):
        def setup(conn):
            fresh = conn.execute("SELECT to_regclass('responses')").fetchone()[0] is None
            for statement in SCHEMA:
                conn.execute(statement.replace("REAL", "DOUBLE PRECISION"))
            if fresh:
                conn.execute("INSERT INTO meta VALUES ('key_format', %s) ON CONFLICT DO NOTHING", (KEY_FORMAT,))

        return connect_pg(url, "generation.cache_url", "request cache", 7215, setup)

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def _key_format(self) -> str | None:
        row = self.conn.execute(self._q("SELECT value FROM meta WHERE name = ?"), ("key_format",)).fetchone()
        return row[0] if row else None

    def iter_many(self, keys: list[str]) -> Iterator[tuple[str, dict]]:
        """(key, record) for the keys that have a stored response, CHUNK keys per statement.

        A generator: at most one chunk of records is decoded and held at a time.
        """
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i:i + CHUNK]
            marks = ",".join(["%s" if self.pg else "?"] * len(chunk))
            rows = self.conn.execute(f"SELECT key, record FROM responses WHERE key IN ({marks})", chunk).fetchall()
            for key, rec in rows:
                yield key, json.loads(rec)

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The stored responses among `keys`; prefer iter_many where the hits may be many."""
        return dict(self.iter_many(keys))

    def stored(self, keys: list[str]) -> set[str]:
        """Which of `keys` have a stored response, without reading the responses."""
        out: set[str] = set()
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i:i + CHUNK]
            marks = ",".join(["%s" if self.pg else "?"] * len(chunk))
            out.update(k for (k,) in self.conn.execute(f"SELECT key FROM responses WHERE key IN ({marks})", chunk))
        return out

    def put(self, key: str, record: dict) -> None:
        self.put_many([(key, record)])

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        """Store several responses in one transaction (one WAL write instead of one per response)."""
        now = time.time()
        rows = [(key, json.dumps(rec, ensure_ascii=False, separators=(",", ":")), now) for key, rec in items]
        if self.pg:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.executemany("INSERT INTO responses (key, record, created) VALUES (%s, %s, %s) "
                                "ON CONFLICT (key) DO NOTHING", rows)
            return
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany("INSERT OR IGNORE INTO responses (key, record, created) VALUES (?, ?, ?)", rows)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def size(self) -> tuple[int, int]:
        """(stored responses, bytes of their stored records): what a response costs to keep."""
        n, b = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(record)), 0) FROM responses").fetchone()
        return int(n), int(b)

    def open_batches(self, endpoint: str) -> list[tuple[str, list[str]]]:
        rows = self.conn.execute(self._q("SELECT batch_id, keys FROM batches WHERE endpoint = ? AND status = 'open' "
                                         "ORDER BY created"), (endpoint,)).fetchall()
        return [(bid, json.loads(keys)) for bid, keys in rows]

    def add_batch(self, batch_id: str, endpoint: str, keys: list[str]) -> None:
        values = (batch_id, endpoint, json.dumps(keys), time.time())
        if self.pg:
            self.conn.execute("INSERT INTO batches VALUES (%s, %s, %s, 'open', %s) ON CONFLICT (batch_id) DO UPDATE "
                              "SET endpoint = EXCLUDED.endpoint, keys = EXCLUDED.keys, status = 'open'", values)
        else:
            self.conn.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, 'open', ?)", values)

    def close_batch(self, batch_id: str, status: str) -> None:
        self.conn.execute(self._q("UPDATE batches SET status = ? WHERE batch_id = ?"), (status, batch_id))

    def close(self) -> None:
        self.conn.close()


def connect_pg(url: str, field: str, what: str, lock: int, setup) -> Any:
    """An autocommit psycopg connection to `url` whose tables `setup(conn)` creates, one creator at a time.

    Several workers may open a new shared database at once: `setup` runs in a transaction under
    the advisory lock `lock`. Errors name `field` and `what`, never the URL's password.
    """
    try:
        import psycopg
    except ImportError:
        raise ConfigError(f"{field}: a postgresql:// {what} needs psycopg 3 (pip install 'psycopg[binary]')") from None
    try:
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            setup(conn)
    except psycopg.Error as e:
        raise ConfigError(f"{_safe_url(url)}: cannot open the {what} ({str(e).strip()[:200]}) ({field})") from None
    return conn


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("://")
    if "@" in tail:
        creds, host = tail.rsplit("@", 1)
        tail = creds.split(":", 1)[0] + ":***@" + host if ":" in creds else creds + "@" + host
    return head + sep + tail


def open_cache(generation) -> ResponseCache:
    """The request cache a generation config names: cache_url when set, else cache_path."""
    return ResponseCache(generation.cache_url or generation.cache_path)


def cache_exists(generation) -> bool:
    return bool(generation.cache_url) or Path(generation.cache_path).exists()


def lookup(cache: ResponseCache, jobs: list) -> dict[str, dict]:
    """Stored responses for `jobs` (a bounded chunk), also found under a legacy key and then copied under the new one."""
    hits = dict(cache.iter_many([j.key for j in jobs]))
    if not cache.legacy:
        return hits
    old = {j.legacy_key(): j.key for j in jobs if j.key not in hits and j.legacy_key is not None}
    moved = [(old[k], rec) for k, rec in cache.iter_many(list(old))]
    if moved:
        cache.put_many(moved)
        hits.update(moved)
    return hits
