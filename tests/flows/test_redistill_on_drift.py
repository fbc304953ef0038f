"""A drift-triggered cycle reuses what it can: `distill run` twice against `distill teacher serve` (its
own process), the second time with the overrides a drift event hands the cycle (parent_run and the
traffic log). The second cycle pays only for the new traffic texts (the request cache answers every
training and holdout prompt of the first), the traffic joins the mix with provenance `traffic`, and
the report and manifest show the cost against a full cycle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.httpserver import free_port
from distill.serve.shadow import ShadowLog

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "flows"))
from conftest import make_tiny_bert_classifier  # noqa: E402
from test_resume import LABELS, cli_env, start_teacher, write_config, write_rows  # noqa: E402

PRICES = ["teacher.input_price_per_1m=1.0", "teacher.output_price_per_1m=2.0"]


def paid(run_dir: Path) -> dict[str, int]:
    """HTTP requests charged to the run's ledger, by purpose (what the teacher was actually paid for)."""
    out: dict[str, int] = {}
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        out[e["purpose"]] = out.get(e["purpose"], 0) + int(e["requests"])
    return out


def run_cycle(tmp_path: Path, cfg: Path, overrides: list[str]) -> Path:
    cmd = [sys.executable, "-m", "distill_flows.cli", "run", str(cfg)] + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return tmp_path / done.stdout.split("run directory:")[-1].strip()


@pytest.mark.slow
def test_a_drift_triggered_cycle_pays_only_for_new_traffic_and_keeps_its_provenance(tmp_path):
    make_tiny_bert_classifier(tmp_path / "teacher-model", LABELS, seed=1)
    make_tiny_bert_classifier(tmp_path / "student-model", LABELS, seed=2)
    train = write_rows(tmp_path / "train.csv", 120, "train", 0)
    write_rows(tmp_path / "test.csv", 30, "test", 1)
    port = free_port()
    teacher = start_teacher(tmp_path / "teacher-model", port, tmp_path)
    cfg = write_config(tmp_path, f"http://127.0.0.1:{port}/v1", max_steps=8, eval_steps=4, checkpoint_steps=4)
    try:
        full = run_cycle(tmp_path, cfg, PRICES)
        # Drifted production traffic: 40 new texts (some asked twice) and 20 the cycle already trained on.
        new = [f"traffic card app {w} {i}" for i, w in enumerate(["lost", "declined", "great", "balance"] * 10)]
        log_url = f"sqlite:///{tmp_path}/shadow.sqlite"
        log = ShadowLog(log_url)
        log.append_many([{"request_id": f"req-{i}", "text": t, "served_by": "champion"}
                         for i, t in enumerate(new + train[:20] + new[:10])])
        log.close()
        drifted = run_cycle(tmp_path, cfg, PRICES + [f"parent_run={full.name}",
                                                     f'filter.mix.traffic_log_url="{log_url}"'])
    finally:
        teacher.terminate()
        teacher.wait(20)

    first, second = paid(full), paid(drifted)
    assert first["generation"] == 84 and first["holdout"] == 30  # 70 % of 120 to the teacher, then the holdout
    # The teacher is paid for the 40 new texts only: training prompts and holdout come from the cache.
    assert second["generation"] == 40 and second.get("holdout", 0) == 0
    # and for one preflight probe, which checks each run that the teacher is up (never cached, by design)
    assert set(second) == {"probe", "generation", "holdout"} and second["probe"] == 1

    m1 = json.loads((full / "manifest.json").read_text())
    m2 = json.loads((drifted / "manifest.json").read_text())
    r1, r2 = m1["spend"]["reuse"]["total"], m2["spend"]["reuse"]["total"]
    assert r1["paid_requests"] == r1["full_requests"] == 114 and r1["reused_requests"] == 0
    assert r2["paid_requests"] == 40 and r2["reused_requests"] == 114 and r2["full_requests"] == 154
    assert r2["full_usd"] == pytest.approx(r1["paid_usd"] + r2["paid_usd"], rel=1e-6)
    assert 0 < r2["paid_usd"] < r2["full_usd"]

    rows = [json.loads(l) for l in (drifted / "dataset.jsonl").read_text().splitlines()]
    traffic = [r for r in rows if r["source"] == "traffic"]
    assert traffic and {r["text"] for r in traffic} <= set(new)
    assert all(r["id"].startswith("traffic-req-") for r in traffic)
    assert m2["sources"] == {"teacher": sum(r["source"] == "teacher" for r in rows), "traffic": len(traffic),
                             "real": sum(r["source"] == "real" for r in rows)}
    assert m2["traffic_log_url"] == log_url and m1["sources"]["traffic"] == 0
    report = (drifted / "report.md").read_text()
    assert "## Teacher cost against a full cycle" in report
    assert "This cycle paid for 40 of 154 teacher requests" in report and "40 recent traffic texts" in report
