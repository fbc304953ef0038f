"""The human spot-check driven the way a reviewer drives it: in the Prefect UI, in a real headless browser.

A real `prefect server` (UI served) is started by the test; two flow runs of the cycle's filter
stage, each in its own process, pause at the spot-check (`pause_flow_run(wait_for_input=
ReviewInput)`). Debian's chromium, through its chromedriver, opens each paused run in the UI,
presses Resume and fills in the form Prefect renders from ReviewInput: the first run is approved
with one sampled row rejected (the run completes and records that decision), the second is
rejected with a reason (the run stops, failed, with that reason). Screenshots of the filled-in
forms are kept under $DISTILL_TEST_ARTIFACTS (default: .distill/test-artifacts/).
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLOW = "spotcheck-review"

# The limit is for a loaded 2-core machine; alone on one the test takes about two minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def review_stage(run_dir: str) -> dict:
    """The cycle's filter stage on 300 BANKING77 rows labelled like `distill teacher serve` answers."""
    from distill_tasks.filter import filter_rows
    from prefect import flow

    from distill.config import FilterConfig
    from distill.data import load_task_rows, read_jsonl, write_jsonl
    from distill.demo import demo_task

    @flow(name=FLOW)
    def review(run_dir: str) -> dict:
        from prefect.runtime import flow_run

        (Path(run_dir) / "flow_run_id").write_text(str(flow_run.id))
        task = demo_task(max_rows=300)
        rows = load_task_rows(task, "train")
        records = [{"id": r["id"], "sample": 0, "status": "done", "error": None, "response": r["gold"],
                    "finish_reason": "stop", "truncated": False,
                    "logprobs": [{"token": r["gold"], "logprob": math.log(0.9),
                                  "top_logprobs": [{"token": r["gold"], "logprob": math.log(0.9)}]}],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 1}, "cost_usd": 0.0, "latency_s": 0.01,
                    "attempts": 1, "cached": False, "model": "teacher", "messages": r["messages"], "params": {}}
                   for r in rows]
        cfg = FilterConfig.model_validate({"spotcheck": {"fraction": 0.05, "poll_interval_s": 1, "timeout_s": 240},
                                           "mix": {"real_fraction": 0.0}})
        inputs = Path(run_dir) / "inputs"
        dataset, report = filter_rows(str(write_jsonl(inputs / "prompts.jsonl", rows)),
                                      str(write_jsonl(inputs / "records.jsonl", records)), None, task, cfg,
                                      run_dir, seed=0)
        return {"rows": len(read_jsonl(dataset)), "spotcheck": report["spotcheck"]}

    return review(run_dir)


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """`prefect server start` with its UI, on a free loopback port, with a database of its own."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian chromium/chromium-driver are not installed (scripts/test.sh installs them)")
    pytest.importorskip("selenium")
    from distill.httpserver import free_port

    home = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    from distill.offline import OFFLINE_ENV

    env = {**OFFLINE_ENV, **os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api, "PREFECT_UI_ENABLED": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_PROFILE", None)
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()  # the UI itself is served
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env}
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


def start_run(prefect_ui: dict, run_dir: Path) -> subprocess.Popen:
    env = {**prefect_ui["env"], "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, str(run_dir)], env=env, cwd=run_dir,
                            stdout=open(run_dir / "flow.log", "wb"), stderr=subprocess.STDOUT)


def flow_run_of(api: str, run_dir: Path, proc: subprocess.Popen, timeout: float = 150):
    """The paused flow run whose spot-check sample was written to run_dir."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def runs():
        async with PrefectClient(api) as client:  # the started server, never an ephemeral one
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the flow exited before pausing: {(run_dir / 'flow.log').read_text()[-2000:]}")
        if (run_dir / "spotcheck.csv").exists() and (run_dir / "flow_run_id").exists():
            mine = (run_dir / "flow_run_id").read_text()
            for r in asyncio.run(runs()):
                if str(r.id) == mine and r.state and r.state.is_paused():
                    return r
        time.sleep(1)
    raise AssertionError("the flow run never paused for the spot-check")


def read_run(api: str, run_id):
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api) as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def review_in_ui(driver, url: str, rejected_id: str | None, reason: str, approve: bool, screenshot: Path) -> None:
    """Open the paused run, press Resume, fill in the review form, keep a screenshot, submit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 90)
    driver.get(url)
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Resume']"))).click()

    def field(label: str):
        return wait.until(ec.presence_of_element_located((
            By.XPATH, "//div[contains(concat(' ', normalize-space(@class), ' '), ' p-label ')]"
                      f"[.//span[normalize-space()='{label}']]")))

    if rejected_id is not None:
        ids = field("Rejected Ids (Optional)")
        ids.find_element(By.XPATH, ".//button[normalize-space()='Add item']").click()
        wait.until(lambda d: ids.find_elements(By.TAG_NAME, "textarea"))[0].send_keys(rejected_id)
    field("Reason (Optional)").find_element(By.TAG_NAME, "textarea").send_keys(reason)
    switch = field("Approve (Optional)").find_element(By.CSS_SELECTOR, "[role=switch]")
    if (switch.get_attribute("aria-checked") == "true") != approve:
        switch.click()
        wait.until(lambda d: (switch.get_attribute("aria-checked") == "true") == approve)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    driver.find_element(By.XPATH, "//div[contains(@class,'p-modal__footer')]//button[normalize-space()='Submit']"
                        ).click()


def wait_final(api: str, run_id, proc: subprocess.Popen, timeout: float = 120):
    proc.wait(timeout)
    deadline = time.monotonic() + 30
    run = read_run(api, run_id)
    while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
        time.sleep(0.5)
        run = read_run(api, run_id)
    assert run.state and run.state.is_final(), f"flow run {run_id} did not finish: {run.state}"
    return run


def test_reviewer_approves_and_rejects_in_the_prefect_ui(prefect_ui, browser, tmp_path):
    artifacts = Path(os.environ.get("DISTILL_TEST_ARTIFACTS", ROOT / ".distill" / "test-artifacts"))
    approved_dir, rejected_dir = tmp_path / "approved", tmp_path / "rejected"
    approved_dir.mkdir()
    rejected_dir.mkdir()
    procs = {d: start_run(prefect_ui, d) for d in (approved_dir, rejected_dir)}  # both pause at once
    try:
        first = flow_run_of(prefect_ui["api"], approved_dir, procs[approved_dir])
        assert not (approved_dir / "dataset.jsonl").exists()  # nothing trained on before the review
        sampled = list(csv.DictReader((approved_dir / "spotcheck.csv").open()))
        wrong = sampled[0]["id"]
        review_in_ui(browser, f"{prefect_ui['ui']}/runs/flow-run/{first.id}", wrong, "wrong intent", True,
                     artifacts / "spotcheck-approve.png")
        done = wait_final(prefect_ui["api"], first.id, procs[approved_dir])
        assert done.state.is_completed(), done.state
        report = json.loads((approved_dir / "filter_report.json").read_text())["spotcheck"]
        assert report["mode"] == "reviewer" and report["rejected_ids"] == [wrong]
        rejected = [json.loads(l) for l in (approved_dir / "rejected.jsonl").read_text().splitlines()]
        assert [r["reason"] for r in rejected if r["id"] == wrong] == ["reviewer: wrong intent"]
        kept = {json.loads(l)["id"] for l in (approved_dir / "dataset.jsonl").read_text().splitlines()}
        assert wrong not in kept and len(kept) >= 250

        second = flow_run_of(prefect_ui["api"], rejected_dir, procs[rejected_dir])
        review_in_ui(browser, f"{prefect_ui['ui']}/runs/flow-run/{second.id}", None,
                     "answers look shifted to card_arrival", False, artifacts / "spotcheck-reject.png")
        stopped = wait_final(prefect_ui["api"], second.id, procs[rejected_dir])
        assert stopped.state.is_failed(), stopped.state
        assert "answers look shifted to card_arrival" in (stopped.state.message or "")
        assert not (rejected_dir / "dataset.jsonl").exists()  # a rejected sample trains nothing
        assert (artifacts / "spotcheck-approve.png").stat().st_size > 10_000
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        artifacts.mkdir(parents=True, exist_ok=True)
        for d in (approved_dir, rejected_dir):
            if (d / "flow.log").exists():
                shutil.copy(d / "flow.log", artifacts / f"spotcheck-{d.name}-flow.log")


if __name__ == "__main__":
    review_stage(sys.argv[1])
