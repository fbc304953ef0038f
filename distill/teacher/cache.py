"""The request cache: every successful response is committed here before it is counted as done.

The cache key is (endpoint, model, messages, sampling params, sample index), never the API key,
so a re-run, or a resume after the process was killed, sends no request that already has a
stored response. SQLite in WAL mode, one row per request.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from distill.config import ConfigError


class ResponseCache:
    """SQLite store of successful teacher responses, one committed row per response.

    WAL mode: a commit is in the OS before `put` returns, so a SIGKILL loses only
    requests still in flight, never a stored response.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, record TEXT NOT NULL, "
                              "created REAL NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, "
                              "keys TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL)")
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path}: cannot open the request cache ({e}) (generation.cache_path)") from None

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for i in range(0, len(keys), 500):  # SQLite caps bound parameters per statement
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, rec in self.conn.execute(f"SELECT key, record FROM responses WHERE key IN ({marks})", chunk):
                out[key] = json.loads(rec)
        return out

    def put(self, key: str, record: dict) -> None:
        self.put_many([(key, record)])

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        """Store several responses in one transaction (one WAL write instead of one per response)."""
        now = time.time()
        rows = [(key, json.dumps(rec, ensure_ascii=False), now) for key, rec in items]
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany("INSERT OR IGNORE INTO responses (key, record, created) VALUES (?, ?, ?)", rows)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def open_batches(self, endpoint: str) -> list[tuple[str, list[str]]]:
        rows = self.conn.execute("SELECT batch_id, keys FROM batches WHERE endpoint = ? AND status = 'open' "
                                 "ORDER BY created", (endpoint,)).fetchall()
        return [(bid, json.loads(keys)) for bid, keys in rows]

    def add_batch(self, batch_id: str, endpoint: str, keys: list[str]) -> None:
        self.conn.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, 'open', ?)",
                          (batch_id, endpoint, json.dumps(keys), time.time()))

    def close_batch(self, batch_id: str, status: str) -> None:
        self.conn.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (status, batch_id))

    def close(self) -> None:
        self.conn.close()
