#!/usr/bin/env bash
# The operate loop end to end, offline, on 127.0.0.1:
#
#   quick demo student -> promoted champion -> `distill serve` with shadow logging (the demo teacher
#   answers in the shadow) -> in-domain traffic, then shifted traffic -> drift-watch fires and emits
#   distill.drift.detected -> the distillation-cycle deployment's trigger (deployments/prefect.yaml)
#   creates a re-distillation flow run on a real local Prefect server.
#
# All state lives in a fresh work directory (the checkout's .distill/ and runs/ are never touched);
# the background servers are stopped on exit. Exits non-zero, with the reason, on any failure.
#
#   scripts/closed_loop.sh                 # a few minutes on CPU
#   DISTILL_LOOP_DIR=/tmp/loop scripts/closed_loop.sh   # choose the (empty or new) work directory
set -euo pipefail
source "$(dirname "$0")/venv.sh"   # cds to the checkout, activates .venv, offline settings
ROOT="$PWD"
PRESET="$ROOT/deployments/configs/banking77-demo.yaml"
TASK=banking77
WORK="${DISTILL_LOOP_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/distill-loop-XXXXXX")}"
mkdir -p "$WORK/logs"
WORK="$(cd "$WORK" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_HOME="$WORK/prefect"           # the server database and settings stay in the work dir
export PREFECT_UI_ENABLED=false
export PREFECT_LOGGING_LEVEL=WARNING
export HF_HUB_DISABLE_PROGRESS_BARS=1         # no weight-loading bars in the output
unset PREFECT_API_URL PREFECT_PROFILE

PIDS=()
say() { printf '\n== %s\n' "$*"; }
die() {
    printf '\nFAILED: %s\n' "$1" >&2
    for log in "${@:2}"; do [ -f "$log" ] && { echo "--- last lines of $log" >&2; tail -n 30 "$log" >&2; }; done
    exit 1
}
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    echo "work directory (logs, registry, runs, shadow log, Prefect database): $WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start a command in its own process group (so the trap stops it and its children), output to a log.
background() { local log="$1"; shift; setsid "$@" >"$log" 2>&1 & PIDS+=($!); }
free_port() { python -c 'from distill.httpserver import free_port; print(free_port())'; }
wait_http() {  # url, seconds, log: wait until the URL answers 200
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "$1" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "$1 did not come up within $2 s" "$3"
        sleep 1
    done
}

PREFECT_PORT=$(free_port); TEACHER_PORT=$(free_port); SERVE_PORT=$(free_port)
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
LOG_URL="sqlite:///$WORK/shadow.sqlite"
# The clients' key for the student server; random per run and checked below never to land on disk.
export DISTILL_SERVE_API_KEY="loop-$(python -c 'import secrets; print(secrets.token_hex(16))')"
# The demo teacher's key, shared by `distill teacher serve` and the student's shadow-teacher client.
export DISTILL_TEACHER_API_KEY="loop-$(python -c 'import secrets; print(secrets.token_hex(16))')"

say "1/6 Prefect server on 127.0.0.1:$PREFECT_PORT (PREFECT_HOME=$PREFECT_HOME)"
background "$WORK/logs/prefect-server.log" prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_http "$PREFECT_API_URL/health" 240 "$WORK/logs/prefect-server.log"
echo "healthy: $PREFECT_API_URL"

say "2/6 work pools and deployments from deployments/prefect.yaml"
# Pools are created from local templates: the process worker's, shipped inside prefect, and the GPU
# pool's Kubernetes template in deployments/k8s/ (`prefect work-pool create --type kubernetes`
# without --base-job-template would ask the collections registry on the internet first).
python - <<'PY' || die "could not create the work pools"
import asyncio, json
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker

gpu = json.loads(Path("deployments/k8s/gpu-job-template.json").read_text())

async def main():
    async with get_client() as client:
        for name, kind, template in (("distill-cpu", "process", ProcessWorker.get_default_base_job_template()),
                                     ("distill-gpu", "kubernetes", gpu)):
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                print(f"work pool {name} ({kind})")
            except ObjectAlreadyExists:
                print(f"work pool {name} exists")

asyncio.run(main())
PY
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$WORK/logs/deploy.log" 2>&1 \
    || die "prefect deploy failed" "$WORK/logs/deploy.log"
COLUMNS=200 prefect deployment ls 2>&1 | tee "$WORK/logs/deployment-ls.log"
COLUMNS=200 prefect automation ls 2>&1 | tee "$WORK/logs/automation-ls.log" | grep redistil-on-drift \
    || die "the redistil-on-drift trigger was not registered" "$WORK/logs/deploy.log"

say "3/6 quick demo cycle (BANKING77, CPU, offline; a few minutes) in $WORK"
cd "$WORK"
distill demo --quick >"$WORK/logs/demo.log" 2>&1 || die "distill demo --quick failed" "$WORK/logs/demo.log"
grep -E "^demo teacher|^ *(teacher_accuracy|student_accuracy|retention|agreement|gate): |^run directory" \
    "$WORK/logs/demo.log" || true
RUN_ID=$(distill models list --task "$TASK" --json | python -c 'import json,sys; e=json.load(sys.stdin); print(e[-1]["run_id"] if e else "")')
[ -n "$RUN_ID" ] || die "the demo registered no student for $TASK" "$WORK/logs/demo.log"
distill models promote "$TASK" "$RUN_ID" --reason "closed-loop check: promote the quick demo student"
distill models list --task "$TASK"

say "4/6 demo teacher on :$TEACHER_PORT and the champion with shadow logging on :$SERVE_PORT"
TEACHER_DIR=$(ls -d "$WORK"/.distill/demo/teacher-*/ | head -n 1)
background "$WORK/logs/teacher.log" distill teacher serve "$TEACHER_DIR" --port "$TEACHER_PORT" \
    --model-name banking77-teacher --threads 1
background "$WORK/logs/serve.log" distill serve "$PRESET" --port "$SERVE_PORT" \
    --set serve.shadow=true --set "serve.log_url=$LOG_URL" --set "registry=$WORK/.distill/registry" \
    --set "teacher.base_url=http://127.0.0.1:$TEACHER_PORT/v1" --set teacher.api_key_env=DISTILL_TEACHER_API_KEY
wait_http "http://127.0.0.1:$TEACHER_PORT/health" 180 "$WORK/logs/teacher.log"
wait_http "http://127.0.0.1:$SERVE_PORT/health" 180 "$WORK/logs/serve.log"
curl -fsS "http://127.0.0.1:$SERVE_PORT/health"; echo

# Send texts through the real openai client, then wait until every shadow answer is logged.
send_traffic() {  # kind (in-domain | shifted), count
    SERVE_PORT=$SERVE_PORT LOG_URL=$LOG_URL KIND=$1 COUNT=$2 python - <<'PY'
import csv, os, random, sqlite3, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

kind, count = os.environ["KIND"], int(os.environ["COUNT"])
data = Path(os.environ["PYTHONPATH"].split(":")[0]) / "distill" / "data"
rng = random.Random(7)
if kind == "in-domain":
    with (data / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        texts = rng.sample([r["text"] for r in csv.DictReader(f)], count)
else:
    # Questions a banking assistant should never see: the bundled out-of-domain list, then more
    # built from everyday topics.
    texts = [l.strip() for l in (data / "ood.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    sys.path.insert(0, str(data.parent.parent / "bench"))  # the drift benchmark's everyday questions
    from drift import extra_ood

    texts += extra_ood()
    rng.shuffle(texts)
    texts = (texts * (count // len(texts) + 1))[:count]

client = openai.OpenAI(base_url=f"http://127.0.0.1:{os.environ['SERVE_PORT']}/v1",
                       api_key=os.environ["DISTILL_SERVE_API_KEY"], max_retries=2)

def ask(text):
    r = client.chat.completions.create(model="distill-student", messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content

db = os.environ["LOG_URL"][len("sqlite:///"):]
def logged():
    if not Path(db).exists():
        return 0, 0
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute("select count(*), count(teacher_label) from requests").fetchone()

before = logged()[0]
t0 = time.perf_counter()
with ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(ask, texts))
took = time.perf_counter() - t0
deadline = time.monotonic() + 300
while logged()[1] < before + count and time.monotonic() < deadline:
    time.sleep(1)
rows, with_teacher = logged()
top = sorted({a: answers.count(a) for a in set(answers)}.items(), key=lambda kv: -kv[1])[:3]
print(f"{kind}: {count} requests in {took:.1f} s; log holds {rows} rows, {with_teacher} with a teacher answer; "
      f"top answers {top}; e.g. {texts[0]!r} -> {answers[0]!r}")
if with_teacher < before + count:
    raise SystemExit(f"only {with_teacher - before} of {count} shadow teacher answers were logged")
PY
}
send_traffic in-domain 200 || die "in-domain traffic failed" "$WORK/logs/serve.log" "$WORK/logs/teacher.log"

say "5/6 drift watch on the live shadow log"
COMMON=("serve.log_url=$LOG_URL" "registry=$WORK/.distill/registry" "store=$WORK/runs"
        "drift.reference_max_rows=300")   # the regression check: the 300 holdout rows the quick demo scored
run_watch() {  # name, then overrides: runs the drift-watch flow on the Prefect server
    NAME=$1 PRESET=$PRESET python - "${@:2}" <<'PY'
import json, os, sys

from distill_flows.drift_watch import drift_watch

out = drift_watch(config_path=os.environ["PRESET"], overrides=sys.argv[1:])
for name, r in out["results"].items():
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
             if k in ("status", "value", "p_value", "ci", "baseline", "n", "reason")}
    print(f"  {name:<17} {'FIRED' if r['fired'] else 'quiet':<6} {shown}")
print(f"  fired: {out['fired'] or 'nothing'}; event id: {out['event_id']}")
with open(f"{os.environ['NAME']}.json", "w") as f:
    json.dump({"fired": out["fired"], "event_id": out["event_id"], "champion": out["model"]["run_id"]}, f)
PY
}
echo "-- control: the 200 in-domain requests (events off)"
run_watch watch-in-domain "${COMMON[@]}" drift.recent_requests=200 drift.emit_events=false \
    || die "drift watch (control) failed"
python -c 'import json; d=json.load(open("watch-in-domain.json")); assert "input_drift" not in d["fired"], d' \
    || die "input_drift fired on in-domain traffic"
# The quick demo scores its student on 300 evenly spaced holdout rows; the registry's agreement
# from them is the divergence baseline, and train.csv-like traffic need not match it within the
# test's margin: divergence may fire here already. Input drift must not (its reference is the
# training inputs until the champion has served drift.min_requests requests before the window).

send_traffic shifted 300 || die "shifted traffic failed" "$WORK/logs/serve.log" "$WORK/logs/teacher.log"
echo "-- after the shift: the 300 most recent requests"
run_watch watch-shifted "${COMMON[@]}" drift.recent_requests=300 || die "drift watch (shifted) failed"
EVENT_ID=$(python -c 'import json; d=json.load(open("watch-shifted.json")); print(d["event_id"] or "")')
[ -n "$EVENT_ID" ] || die "no sensor fired on the shifted traffic, so no distill.drift.detected event"

say "6/6 the trigger's re-distillation run (waiting up to 90 s)"
RUN_ID=$RUN_ID PRESET=$PRESET python - <<'PY' || die "the drift event created no distillation-cycle flow run" "$WORK/logs/prefect-server.log"
import asyncio, json, os, time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.sorting import FlowRunSort

want = f"parent_run={os.environ['RUN_ID']}"
preset = os.environ["PRESET"]

async def main():
    async with get_client() as client:
        dep = await client.read_deployment_by_name("distillation-cycle/distillation-cycle")
        deadline = time.monotonic() + 90
        while True:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC)
            # The weekly cron schedules runs too; the trigger's run is the one with the drift lineage.
            triggered = [r for r in runs if want in (r.parameters.get("overrides") or [])]
            if triggered or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        if not triggered:
            raise SystemExit(f"no flow run of {dep.name} carries {want} ({len(runs)} runs seen)")
        r = triggered[0]
        if r.parameters.get("config_path") != preset:
            raise SystemExit(f"the triggered run got config_path={r.parameters.get('config_path')!r}, not {preset!r}")
        by = r.created_by.display_value if r.created_by else None
        print(f"flow run {r.id} ({r.name}) of deployment {dep.name}: state {r.state_name}, created by {by}")
        print("parameters:", json.dumps(r.parameters, indent=1))

asyncio.run(main())
PY

# The API keys must not have been written anywhere (logs, shadow log, Prefect database).
if grep -rla -- "$DISTILL_SERVE_API_KEY" "$WORK" >/dev/null 2>&1; then
    die "the serve API key appears in files under $WORK"
fi
if grep -rla -- "$DISTILL_TEACHER_API_KEY" "$WORK" >/dev/null 2>&1; then
    die "the teacher API key appears in files under $WORK"
fi
say "closed loop OK: champion $RUN_ID drifted (event $EVENT_ID) and a re-distillation run was created"
