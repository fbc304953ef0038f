"""The traffic/shadow log and the disagreement review (`distill shadow report`).

Every request the student server answers becomes one row of the `requests`
table: the input text, which model served it, and, for each model that was
asked (champion, challenger, teacher), its label, confidence, label
distribution and latency. SQLite by default (`sqlite:///path`); a PostgreSQL
URL (`postgresql://...`, run through psycopg 3) uses the same SQLAlchemy Core
code path.

The drift sensors read recent rows back from here; `review()` adjudicates the
rows where the student and its reference disagree.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

from distill.config import ConfigError
from distill.data import locked_beside, read_table

# Columns holding JSON ({label: prob}); everything else is a scalar.
JSON_COLUMNS = ("champion_probs", "challenger_probs", "teacher_probs")
MODELS = ("champion", "challenger", "teacher")


def _json(value: Any) -> str:
    """A JSON column's text. orjson: json.dumps took 63 µs for one row's 77 label probabilities
    (8 µs here), in the thread that shares the server's cores and GIL; floats round-trip exactly."""
    return orjson.dumps(value).decode()


def _table(metadata):
    from sqlalchemy import Column, Float, Integer, String, Table, Text

    cols = [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(64), index=True),
        Column("ts", Float, index=True),
        Column("text", Text),
        Column("served_by", String(16)),
        Column("served_label", Text),
        Column("served_confidence", Float),
        Column("fallback", Integer),
        Column("canary", Integer),
        Column("gold", Text),
    ]
    for m in MODELS:
        cols += [Column(f"{m}_label", Text), Column(f"{m}_confidence", Float), Column(f"{m}_probs", Text),
                 Column(f"{m}_latency_ms", Float), Column(f"{m}_run", Text)]
    cols.append(Column("teacher_error", Text))
    return Table("requests", metadata, *cols)


def _history_table(metadata):
    from sqlalchemy import Column, Float, Integer, String, Table, Text

    return Table(
        "drift_history", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ts", Float),
        Column("model_run", Text),
        Column("holdout_accuracy", Float),
        Column("holdout_entropy", Float),
        Column("disagreement", Float),
        Column("fired", String(256)),
    )


class ShadowLog:
    """Append-only request log on SQLite or PostgreSQL.

    Args:
        url: `sqlite:///relative/or/absolute.sqlite` or a SQLAlchemy PostgreSQL URL.
    """

    def __init__(self, url: str):
        from sqlalchemy import MetaData, create_engine, event

        self.url = url
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            # timeout: a drift-watch reader and the server's writer share the file.
            self.engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _record):  # WAL: readers never block the serving writer
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        elif url.startswith("postgresql"):
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError

            # SQLAlchemy maps a bare postgresql:// to psycopg2; the installed driver is psycopg 3.
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            try:
                # connect_timeout: an unreachable host fails server start-up in seconds, not minutes.
                self.engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
            except (ModuleNotFoundError, NoSuchModuleError) as e:
                raise ConfigError(f"serve.log_url: the PostgreSQL driver is not available ({e}); "
                                  "install psycopg and use postgresql+psycopg://, or use sqlite:///") from None
            except (ArgumentError, ValueError) as e:
                raise ConfigError(f"serve.log_url: malformed PostgreSQL URL ({e})") from None
        else:
            raise ConfigError(f"serve.log_url: unsupported URL {url.split('://')[0]}:// (sqlite:/// or postgresql://)")
        self.metadata = MetaData()
        self.requests = _table(self.metadata)
        self.history = _history_table(self.metadata)
        self._create_tables()
        self._lock = threading.Lock()  # one writer at a time: SQLite would raise "database is locked"

    def _create_tables(self) -> None:
        """Create the tables, one opener at a time: `serve.workers` processes open a new log together, and
        two that both saw no table both ran CREATE TABLE ("table requests already exists" killed a worker)."""
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        try:
            if self.engine.dialect.name == "sqlite":
                with locked_beside(self.engine.url.database):
                    self.metadata.create_all(self.engine)
            else:
                with self.engine.begin() as conn:
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('distill.request_log'))"))
                    self.metadata.create_all(conn)
        except OperationalError as e:
            self.engine.dispose()
            # The rendered URL hides the password; the driver's message names host, port and cause.
            where = self.engine.url.render_as_string(hide_password=True)
            cause = " ".join(str(e.orig).split()) or type(e.orig).__name__
            raise ConfigError(f"serve.log_url: cannot open the log database {where}: {cause}") from None

    def append(self, row: dict[str, Any]) -> None:
        """Insert one request row (unknown keys are an error: the schema is the contract)."""
        self.append_many([row])

    def append_many(self, rows: Iterable[dict[str, Any]]) -> None:
        names = set(self.requests.c.keys())
        values = []
        for row in rows:
            extra = set(row) - names
            if extra:
                raise ValueError(f"unknown shadow-log column(s): {', '.join(sorted(extra))}")
            v = dict(row)
            v.setdefault("ts", time.time())
            for c in JSON_COLUMNS:
                if v.get(c) is not None and not isinstance(v[c], str):
                    v[c] = _json(v[c])
            values.append(v)
        if not values:
            return
        with self._lock, self.engine.begin() as conn:
            conn.execute(self.requests.insert(), values)

    def update(self, request_id: str, fields: dict[str, Any]) -> None:
        """Add columns to an already logged request (shadow answers that arrive after the row)."""
        if not fields:
            return
        v = {k: (_json(x) if k in JSON_COLUMNS and x is not None and not isinstance(x, str) else x)
             for k, x in fields.items()}
        with self._lock, self.engine.begin() as conn:
            conn.execute(self.requests.update().where(self.requests.c.request_id == request_id).values(**v))

    def recent(self, limit: int | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """The most recent rows (newest last), JSON columns decoded."""
        from sqlalchemy import select

        q = select(self.requests).order_by(self.requests.c.id.desc())
        if since is not None:
            q = q.where(self.requests.c.ts >= since)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        for r in rows:
            for c in JSON_COLUMNS:
                if r.get(c):
                    r[c] = json.loads(r[c])
        return rows[::-1]

    def count(self) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(self.requests)).scalar_one())

    def record_watch(self, model_run: str | None, holdout_accuracy: float | None, holdout_entropy: float | None,
                     disagreement: float | None, fired: list[str]) -> None:
        """Remember one drift-watch measurement (the entropy-collapse sensor needs the history)."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(self.history.insert(), [{
                "ts": time.time(), "model_run": model_run, "holdout_accuracy": holdout_accuracy,
                "holdout_entropy": holdout_entropy, "disagreement": disagreement, "fired": ",".join(fired)}])

    def watch_history(self) -> list[dict[str, Any]]:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(self.history).order_by(self.history.c.id))]

    def close(self) -> None:
        self.engine.dispose()


# --- disagreement review -------------------------------------------------------------------------


def grader_messages(text: str, answer_a: str, answer_b: str, labels: list[str] | None = None) -> list[dict]:
    """The grader prompt: which of two labels is correct for the input (format_input)."""
    label_line = f"\nValid labels: {', '.join(labels)}" if labels else ""
    return [
        {"role": "system", "content": "You judge classification answers. Reply with exactly one letter: "
                                      "A, B, or N if neither is correct."},
        {"role": "user", "content": f"Input: {text}{label_line}\n\nA: {answer_a}\nB: {answer_b}\n\n"
                                    "Which answer is correct? Reply A, B or N."},
    ]


_VERDICT = re.compile(r"^\W*(?:answer\s*[:=]?\s*)?\(?([ABN])\)?(?:\W|$)", re.IGNORECASE)


def parse_grader_reply(reply: str | None) -> str | None:
    """The grader's verdict "A", "B" or "N" (neither), or None for an unreadable reply (format_output)."""
    if not reply or not isinstance(reply, str):
        return None
    if re.match(r"^\W*neither\b", reply.strip(), re.IGNORECASE):
        return "N"
    m = _VERDICT.match(reply.strip())
    if m:
        return m.group(1).upper()
    # JSON replies such as {"answer": "B"} from graders that insist on structure
    try:
        obj = json.loads(reply)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(obj, dict):
        for key in ("answer", "verdict", "choice"):
            v = obj.get(key)
            if isinstance(v, str) and v.strip().upper() in ("A", "B", "N"):
                return v.strip().upper()
    return None


def load_gold(path: str | Path, text_field: str = "text", label_field: str = "label") -> dict[str, str]:
    """{text: gold label} from a CSV/JSONL file (errors name file and line)."""

    gold: dict[str, str] = {}
    for row in read_table(path, [text_field, label_field]):
        label = row[label_field]
        if label not in (None, ""):
            gold[str(row[text_field])] = str(label)
    return gold


def review(rows: list[dict[str, Any]], *, student: str = "champion", max_wrong: float = 0.35,
           gold: dict[str, str] | None = None,
           grader: Callable[[str, str, str], str | None] | None = None) -> dict[str, Any]:
    """Adjudicate the rows where the student disagrees with its reference and decide readiness.

    The reference is the teacher when it answered, otherwise the other student.
    Each disagreement is settled by, in order: a gold label (the row's `gold`
    column or `gold` by text), the grader (`grader(text, student_label,
    reference_label)` returns "A" = student right, "B" = reference right, "N" =
    neither, None = no verdict), or the teacher when the teacher is not itself a
    party. Unsettled disagreements are counted but never guessed.

    Args:
        rows: shadow-log rows (ShadowLog.recent()).
        student: "champion" or "challenger": whose readiness is judged.
        max_wrong: the student is not ready when wrong on more than this share of settled disagreements.
        gold: {text: label} gold labels, e.g. from load_gold().
        grader: adjudicator for disagreements without gold.
    Returns: {"student", "rows", "compared", "disagreements", "settled", "student_wrong", "wrong_share",
        "max_wrong", "ready" (True/False, or None without any settled disagreement), "by" {gold, grader,
        teacher}, "examples" (up to 20 settled cases where the student was wrong)}.
    """
    if student not in ("champion", "challenger"):
        raise ValueError("student must be 'champion' or 'challenger'")
    other = "challenger" if student == "champion" else "champion"
    gold = gold or {}
    compared = disagreements = settled = wrong = 0
    by = {"gold": 0, "grader": 0, "teacher": 0}
    examples = []
    for r in rows:
        s = r.get(f"{student}_label")
        ref_name = "teacher" if r.get("teacher_label") is not None else other
        ref = r.get(f"{ref_name}_label")
        if s is None or ref is None:
            continue
        compared += 1
        if s == ref:
            continue
        disagreements += 1
        truth = r.get("gold") or gold.get(r.get("text") or "")
        verdict = None  # True: the student is wrong
        if truth is not None:
            by["gold"] += 1
            verdict = s != truth
        elif grader is not None:
            v = grader(r.get("text") or "", s, ref)
            if v in ("A", "B", "N"):
                by["grader"] += 1
                verdict = v != "A"
        if verdict is None and ref_name != "teacher" and r.get("teacher_label") is not None:
            by["teacher"] += 1
            verdict = s != r["teacher_label"]
        if verdict is None:
            continue
        settled += 1
        if verdict:
            wrong += 1
            if len(examples) < 20:
                examples.append({"text": r.get("text"), "student": s, "reference": ref, "reference_model": ref_name,
                                 "gold": truth})
    share = wrong / settled if settled else None
    return {"student": student, "rows": len(rows), "compared": compared, "disagreements": disagreements,
            "settled": settled, "student_wrong": wrong, "wrong_share": share, "max_wrong": max_wrong,
            "ready": None if share is None else share <= max_wrong, "by": by, "examples": examples}


def render_review(result: dict[str, Any]) -> str:
    """Markdown summary of review() for the CLI and artifacts."""
    ready = {True: "READY", False: "NOT READY", None: "UNDECIDED (no settled disagreement)"}[result["ready"]]
    share = "n/a" if result["wrong_share"] is None else f"{result['wrong_share']:.1%}"
    lines = [
        f"# Disagreement review: {result['student']}",
        "",
        f"**{ready}**: the student is wrong on {share} of settled disagreements "
        f"(limit {result['max_wrong']:.0%}).",
        "",
        "| rows | compared | disagreements | settled | student wrong | by gold | by grader | by teacher |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['rows']} | {result['compared']} | {result['disagreements']} | {result['settled']} | "
        f"{result['student_wrong']} | {result['by']['gold']} | {result['by']['grader']} | {result['by']['teacher']} |",
    ]
    if result["examples"]:
        lines += ["", "## Student wrong (first 20)", "", "| input | student | reference | gold |", "|---|---|---|---|"]
        for e in result["examples"]:
            text = (e["text"] or "").replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"| {text} | {e['student']} | {e['reference']} ({e['reference_model']}) | {e['gold'] or ''} |")
    return "\n".join(lines) + "\n"


def openai_grader(endpoint, api_key: str | None, labels: list[str] | None = None
                  ) -> Callable[[str, str, str], str | None]:
    """A grader callable for review() backed by an OpenAI-compatible endpoint (TeacherConfig).

    A failed call yields None (unsettled), never a guessed verdict.
    """
    import openai

    client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key or "unused", timeout=endpoint.timeout_s,
                           max_retries=2)

    def grade(text: str, a: str, b: str) -> str | None:
        try:
            resp = client.chat.completions.create(model=endpoint.model, messages=grader_messages(text, a, b, labels),
                                                  temperature=0, max_tokens=4)
        except openai.OpenAIError:
            return None
        return parse_grader_reply(resp.choices[0].message.content if resp.choices else None)

    return grade
