"""The job table: SQLite under the job root (``jobs.sqlite``), with every state change recorded as a transition.

One connection and one lock: the table is small, and the lock keeps statements from interleaving.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    base TEXT NOT NULL,
    dataset TEXT NOT NULL,
    adapter_name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    epoch REAL,
    loss REAL,
    eta_s REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    adapter TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    queue_seq INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    report TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, queue_seq);
CREATE TABLE IF NOT EXISTS transitions (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions (job, n);
"""
# JSON columns and what an empty one reads as.
JSON_COLUMNS = {"config": "{}", "metrics": "{}", "report": "null"}
# Columns added since the first schema, for tables an older server created.
ADDED_COLUMNS = {"report": "TEXT"}


class JobStore:
    """The job table behind one connection and one lock: small, and the lock keeps statements from interleaving."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            present = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self._conn.execute("PRAGMA user_version=2")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @staticmethod
    def _decode(row: sqlite3.Row | None) -> dict | None:
        if row is None:
            return None
        d = dict(row)
        for k, empty in JSON_COLUMNS.items():
            d[k] = json.loads(d[k] or empty)
        return d

    def one(self, job_id: str) -> dict | None:
        with self._lock:
            return self._decode(self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def select(self, where: str = "1", params: tuple = (), order: str = "seq DESC", limit: int = -1) -> list[dict]:
        with self._lock:
            rows = self._conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY {order} LIMIT ?",
                                      (*params, limit)).fetchall()
        return [self._decode(r) for r in rows]

    def scalar(self, sql: str, params: tuple = ()) -> Any:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()[0]

    def insert(self, job: dict, *, detail: str | None = None) -> None:
        cols = list(job)
        values = [json.dumps(job[c]) if c in JSON_COLUMNS else job[c] for c in cols]
        with self._lock, self._conn:
            self._conn.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
            self._conn.execute("INSERT INTO transitions (job, state, at, detail) VALUES (?, ?, ?, ?)",
                               (job["id"], job["state"], now(), detail))

    def update(self, job_id: str, *, detail: str | None = None, **fields: Any) -> None:
        """Change fields; a ``state`` among them is also recorded as a transition."""
        if not fields:
            return
        cols = list(fields)
        values = [json.dumps(fields[c]) if c in JSON_COLUMNS else fields[c] for c in cols]
        with self._lock, self._conn:
            self._conn.execute(f"UPDATE jobs SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?",
                               (*values, job_id))
            if "state" in fields:
                self._conn.execute("INSERT INTO transitions (job, state, at, detail) VALUES (?, ?, ?, ?)",
                                   (job_id, fields["state"], now(), detail))

    def transitions(self, job_id: str, after: int = 0) -> list[dict]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM transitions WHERE job = ? AND n > ? ORDER BY n",
                                      (job_id, after)).fetchall()
        return [dict(r) for r in rows]

    def last_transition(self, job_id: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COALESCE(MAX(n), 0) FROM transitions WHERE job = ?",
                                      (job_id,)).fetchone()[0]
