"""The shadow/traffic log on a real PostgreSQL 15 server started on 127.0.0.1 by the test: the same
operations give the same answers as on SQLite, the student server logs to it, and
`distill shadow report --log-url postgresql://...` reads it."""

from __future__ import annotations

import itertools
import math
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from distill.config import ConfigError, ServeConfig, TeacherConfig
from distill.httpserver import free_port, start_in_thread
from distill.serve.shadow import ShadowLog

# The same tiny challenger and teacher as the SQLite serving tests (pytest picks fixtures up by name).
from tests.distill.serve.test_app import challenger_dir, teacher_url  # noqa: F401
from tests.distill.serve.test_shadow import seed_disagreements

LABELS = ["positive", "negative", "neutral"]
KEY = "test-pg-key"


def _server_commands() -> tuple[str, str, list[str], str]:
    """(initdb, pg_ctl, command prefix, owner): PostgreSQL refuses to run as root, so root runs it as `postgres`."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
    if os.geteuid() != 0:
        return initdb, pg_ctl, [], pwd.getpwuid(os.geteuid()).pw_name
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no `postgres` system user exists to run the server")
    if not runuser:
        pytest.skip("running as root and `runuser` is not available to drop to the `postgres` user")
    return initdb, pg_ctl, [runuser, "-u", "postgres", "--"], "postgres"


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (trust auth); yields its `postgres` database URL."""
    initdb, pg_ctl, prefix, owner = _server_commands()
    # Not under pytest's tmp dir: that is private to the current user, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    data = root / "data"
    if prefix:
        shutil.chown(root, user=owner)
    port = free_port()

    def run(*args: str) -> None:
        res = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log = root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{tail}")

    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C")
        run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)


_db_numbers = itertools.count()


@pytest.fixture
def pg_url(postgres_url):
    """A fresh, empty database on the session server, so every test starts from no tables."""
    import psycopg

    name = f"shadow_{next(_db_numbers)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_url.rsplit("/", 1)[0] + "/" + name


def pg_rows(url: str, sql: str) -> list[tuple]:
    """Read straight from the server with psycopg: proves where the rows really are."""
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def exercise(log: ShadowLog) -> dict:
    """Every ShadowLog operation, returning what each one reads back."""
    log.append({"request_id": "r1", "ts": 100.0, "text": "my card is lost ✓ ünïcode", "served_by": "champion",
                "champion_label": "negative", "champion_confidence": 0.61, "champion_latency_ms": 3.5,
                "champion_probs": {"positive": 0.09, "negative": 0.61, "neutral": 0.3}, "canary": 0, "fallback": 0})
    log.append_many([{"request_id": f"r{i}", "ts": 100.0 + i, "text": f"text {i}", "served_by": "challenger",
                      "challenger_label": "neutral", "challenger_confidence": 0.5 + i / 100, "canary": 1}
                     for i in range(2, 6)])
    log.append_many([])
    log.update("r1", {"teacher_label": "positive", "teacher_confidence": 0.8, "teacher_latency_ms": 12.25,
                      "teacher_probs": {"positive": 0.8, "negative": 0.15, "neutral": 0.05}, "teacher_run": "t"})
    log.update("r1", {})
    log.update("nope", {"teacher_label": "x"})  # no such request: nothing changes
    with pytest.raises(ValueError, match="unknown shadow-log column"):
        log.append({"request_id": "r9", "api_key": "leak"})
    log.record_watch("run-1", 0.9, 0.42, 0.1, [])
    log.record_watch("run-2", None, 0.05, 0.3, ["entropy_collapse", "disagreement"])
    return {
        "all": log.recent(),
        "last2": log.recent(limit=2),
        "since": log.recent(since=103.0),
        "count": log.count(),
        "history": [{k: v for k, v in h.items() if k != "ts"} for h in log.watch_history()],
    }


def test_round_trip_matches_sqlite(pg_url, tmp_path):
    pg = ShadowLog(pg_url)
    assert pg.engine.dialect.driver == "psycopg"  # postgresql:// runs on psycopg 3, not the absent psycopg2
    got = exercise(pg)
    want = exercise(ShadowLog(f"sqlite:///{tmp_path}/log.sqlite"))
    assert got == want
    assert got["count"] == 5 and [r["request_id"] for r in got["last2"]] == ["r4", "r5"]
    assert [r["request_id"] for r in got["since"]] == ["r3", "r4", "r5"]
    assert got["all"][0]["teacher_probs"]["positive"] == 0.8 and got["all"][0]["text"].endswith("ünïcode")
    assert got["history"][1]["fired"] == "entropy_collapse,disagreement"
    # A second ShadowLog on the same database (the drift watcher beside the server) sees the rows.
    again = ShadowLog(pg_url)
    assert again.count() == 5
    pg.close()
    again.close()
    assert pg_rows(pg_url, "SELECT count(*), sum(canary) FROM requests") == [(5, 4)]
    assert pg_rows(pg_url, "SELECT teacher_latency_ms FROM requests WHERE request_id = 'r1'") == [(12.25,)]


def test_unreachable_or_missing_database_is_a_config_error(postgres_url):
    port = free_port()  # nothing listens here
    with pytest.raises(ConfigError, match="serve.log_url") as e:
        ShadowLog(f"postgresql://someone:s3cret-pw@127.0.0.1:{port}/db")
    assert "s3cret-pw" not in str(e.value) and str(port) in str(e.value)
    with pytest.raises(ConfigError, match="malformed PostgreSQL URL"):
        ShadowLog("postgresql://someone@127.0.0.1:notaport/db")
    with pytest.raises(ConfigError, match="no_such_db"):
        ShadowLog(postgres_url.rsplit("/", 1)[0] + "/no_such_db")


def ask(url: str, text: str):
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    return c.chat.completions.with_raw_response.create(
        model="distill-student", messages=[{"role": "system", "content": "Classify."},
                                           {"role": "user", "content": text}])


def test_student_server_shadow_logs_to_postgres(tiny_classifier, challenger_dir, teacher_url, pg_url):
    from distill.serve.app import create_app

    teacher = TeacherConfig(base_url=teacher_url, model="tiny-teacher")
    serve = ServeConfig(log_url=pg_url, shadow=True)
    app = create_app(tiny_classifier, serve, challenger_dir=challenger_dir, teacher=teacher, teacher_api_key="t",
                     api_key=KEY)
    texts = ["i love my new card", "my card was declined", "how do i top up", "the app is terrible", "ok thanks"]
    served = {}
    with start_in_thread(app) as srv:
        for t in texts:
            raw = ask(srv.url, t)
            assert raw.headers["x-distill-model"] == "champion"
            served[t] = (raw.parse().choices[0].message.content, float(raw.headers["x-distill-confidence"]))
        assert app.state.drain()
    rows = ShadowLog(pg_url).recent()
    assert sorted(r["text"] for r in rows) == sorted(texts)
    for r in rows:
        assert r["served_by"] == "champion" and r["teacher_error"] is None and r["teacher_run"] == "tiny-teacher"
        label, confidence = served[r["text"]]
        assert r["champion_label"] == label and r["champion_confidence"] == pytest.approx(confidence, rel=1e-5)
        for m in ("champion", "challenger", "teacher"):
            assert r[f"{m}_label"] in LABELS
            assert 1 / len(LABELS) <= r[f"{m}_confidence"] <= 1
            assert r[f"{m}_confidence"] == pytest.approx(max(r[f"{m}_probs"].values()), rel=1e-5)
            assert math.isclose(sum(r[f"{m}_probs"].values()), 1.0, rel_tol=1e-3)
            assert r[f"{m}_latency_ms"] > 0
    # The same rows, read with the driver alone.
    raw_rows = pg_rows(pg_url, "SELECT champion_label, challenger_label, teacher_label, champion_latency_ms, "
                               "challenger_latency_ms, teacher_latency_ms, served_confidence FROM requests")
    assert len(raw_rows) == len(texts) and all(v is not None for row in raw_rows for v in row)

    # Teacher fallback on PostgreSQL: the paid answer is inserted before it is returned, and the
    # shadow answers are added to that row later (the update path).
    serve = ServeConfig(log_url=pg_url, shadow=True, fallback_confidence=0.99)
    app = create_app(tiny_classifier, serve, challenger_dir=challenger_dir, teacher=teacher, teacher_api_key="t",
                     api_key=KEY)
    with start_in_thread(app) as srv:
        raw = ask(srv.url, "where is my refund")
        assert raw.headers["x-distill-model"] == "teacher"
        assert app.state.drain()
    row = ShadowLog(pg_url).recent(limit=1)[0]
    assert row["text"] == "where is my refund" and row["served_by"] == "teacher" and row["fallback"] == 1
    assert row["teacher_label"] == raw.parse().choices[0].message.content
    assert row["champion_label"] in LABELS and row["challenger_label"] in LABELS
    assert row["challenger_latency_ms"] > 0


def test_shadow_report_cli_reads_postgres(pg_url, tmp_path):
    from distill_flows.cli import app

    gold = seed_disagreements(pg_url, tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["shadow", "report", "--log-url", pg_url, "--gold", str(gold),
                              "--out", str(tmp_path / "review.md")])
    assert res.exit_code == 1, res.output  # wrong on 1 of 2 settled disagreements: 50 % > 35 %
    assert "NOT READY" in res.output and "| 3 | 3 | 2 | 2 | 1 |" in res.output
    assert (tmp_path / "review.json").exists()
    res = runner.invoke(app, ["shadow", "report", "--log-url", pg_url, "--gold", str(gold), "--max-wrong", "0.5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["shadow", "report", "--log-url", pg_url.rsplit("/", 1)[0] + "/missing_db"])
    assert res.exit_code == 2 and "missing_db" in res.output
