"""The canary judge: is the challenger, on the traffic it served, significantly worse than the champion?

Two one-sided two-proportion z tests (distill.drift.stats.proportion_drop_test) over the same window
of recent logged requests, each arm judged on the requests it served itself:

- agreement: the served label against the teacher's answer (shadow mode, fallback, or a re-label);
- error rate: the served label against gold feedback (`distill feedback`), as accuracy = 1 - error rate.

H0 for each: the challenger's rate >= the champion's rate - margin. Each test needs `min_requests`
judged requests in both arms; below that it reports "not enough data" and cannot stop the canary.
The canary is stopped when either test rejects H0 at `alpha`.
"""

from __future__ import annotations

from typing import Sequence

from distill.drift.stats import proportion_drop_test

NOT_ENOUGH = "not enough data"


def _arm(rows: Sequence[dict], arm: str, run: str | None) -> list[dict]:
    """The requests `arm` ("champion" or "challenger") served itself (a teacher fallback is no one's)."""
    return [r for r in rows if r.get("served_by") == arm and r.get(f"{arm}_label") is not None
            and (run is None or r.get(f"{arm}_run") == run)]


def _hits(rows: Sequence[dict], arm: str, reference: str) -> tuple[int, int]:
    pairs = [(r[f"{arm}_label"], r.get(reference)) for r in rows if r.get(reference) not in (None, "")]
    return sum(a == b for a, b in pairs), len(pairs)


def _test(name: str, champ: tuple[int, int], chall: tuple[int, int], min_requests: int, alpha: float,
          margin: float) -> dict:
    (kc, nc), (kx, nx) = champ, chall
    out = {"test_of": name, "champion_k": kc, "champion_n": nc, "challenger_k": kx, "challenger_n": nx,
           "champion_rate": kc / nc if nc else None, "challenger_rate": kx / nx if nx else None,
           "min_n": min_requests, "alpha": alpha, "margin": margin, "test": "two-proportion z test (one-sided)"}
    if nc < min_requests or nx < min_requests:
        return {**out, "status": NOT_ENOUGH, "worse": False, "p_value": None,
                "reason": f"champion {nc}, challenger {nx} judged requests; {min_requests} needed in each"}
    t = proportion_drop_test(kx, nx, kc / nc, nc, margin)
    worse = t["p_value"] < alpha
    return {**out, "status": "worse" if worse else "not worse", "worse": worse, "p_value": t["p_value"],
            "z": t["z"], "difference": t["difference"], "ci": t["ci"], "confidence": t["confidence"]}


def judge_canary(rows: Sequence[dict], champion_run: str | None, challenger_run: str | None,
                 min_requests: int, alpha: float, margin: float = 0.0) -> dict:
    """The canary decision over `rows` (the judged window of the traffic log, any order).

    Args:
        rows: logged requests (ShadowLog.recent()).
        champion_run, challenger_run: run ids the arms are filtered on (None: any run).
        min_requests: judged requests each arm needs before a test runs.
        alpha: significance level of each test.
        margin: drop below the champion's rate tolerated before it counts.
    Returns {"decision": "stop"|"keep"|"not enough data", "tests": {"agreement": ..., "accuracy": ...},
    "served": {"champion": n, "challenger": n}, "reason"}.
    """
    champ, chall = _arm(rows, "champion", champion_run), _arm(rows, "challenger", challenger_run)
    tests = {
        "agreement": _test("agreement with the teacher", _hits(champ, "champion", "teacher_label"),
                           _hits(chall, "challenger", "teacher_label"), min_requests, alpha, margin),
        "accuracy": _test("accuracy on gold feedback (1 - error rate)", _hits(champ, "champion", "gold"),
                          _hits(chall, "challenger", "gold"), min_requests, alpha, margin),
    }
    worse = [n for n, t in tests.items() if t["worse"]]
    if worse:
        decision = "stop"
        reason = "; ".join(f"{n}: challenger {tests[n]['challenger_rate']:.4f} vs champion "
                           f"{tests[n]['champion_rate']:.4f}, p = {tests[n]['p_value']:.3g} < {alpha:g}"
                           for n in worse)
    elif all(t["status"] == NOT_ENOUGH for t in tests.values()):
        decision, reason = NOT_ENOUGH, "; ".join(f"{n}: {t['reason']}" for n, t in tests.items())
    else:
        decision = "keep"
        reason = "; ".join(f"{n}: " + (t["reason"] if t["status"] == NOT_ENOUGH else f"p = {t['p_value']:.3g}")
                           for n, t in tests.items())
    return {"decision": decision, "tests": tests, "reason": reason,
            "served": {"champion": len(champ), "challenger": len(chall)}}


def render_decision(result: dict, context: dict) -> str:
    """Markdown of one canary judgement (the flow's artifact): the decision, then one row per test."""
    head = {"stop": "**Canary stopped**", "keep": "Canary kept", NOT_ENOUGH: "Canary kept (not enough data)"}
    lines = ["# Canary watch", "", f"{head[result['decision']]}: {result['reason']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in context.items()]
    lines += ["", "| test | decision | champion | challenger | difference | p-value | 95% CI | min n |",
              "|---|---|---:|---:|---:|---:|---|---:|"]
    for t in result["tests"].values():
        def rate(arm: str) -> str:
            r = t[f"{arm}_rate"]
            return "n/a" if r is None else f"{r:.4f} ({t[f'{arm}_k']}/{t[f'{arm}_n']})"

        p = "n/a" if t["p_value"] is None else f"{t['p_value']:.4g}"
        ci = f"[{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]" if t.get("ci") else "n/a"
        diff = f"{t['difference']:+.4f}" if t.get("difference") is not None else "n/a"
        lines.append(f"| {t['test_of']} | {t['status']} | {rate('champion')} | {rate('challenger')} | {diff} | "
                     f"{p} | {ci} | {t['min_n']} |")
    return "\n".join(lines) + "\n"
