"""Every drift watch's per-sensor numbers, kept next to the traffic log, and their plot over time.

One row per (watch, sensor) in the `drift_signals` table of the shadow-log database:
the value the sensor judged, its p-value, its interval and its decision. The report's
plot reads them back, so a person sees a signal creep towards its limit before it fires.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _table(metadata):
    from sqlalchemy import Column, Float, Integer, String, Table, Text

    return Table(
        "drift_signals", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("ts", Float, index=True),
        Column("model_run", Text),
        Column("sensor", String(64)),
        Column("value", Float),
        Column("p_value", Float),
        Column("ci_lo", Float),
        Column("ci_hi", Float),
        Column("baseline", Float),
        Column("status", String(32)),
    )


class SignalHistory:
    """The drift_signals table on an SQLAlchemy engine (the shadow log's)."""

    def __init__(self, engine):
        from sqlalchemy import MetaData

        self.engine = engine
        self.metadata = MetaData()
        self.table = _table(self.metadata)
        self.metadata.create_all(engine)

    def record(self, model_run: str | None, results: dict[str, dict], ts: float | None = None) -> None:
        ts = time.time() if ts is None else ts
        rows = []
        for name, r in results.items():
            ci = r.get("ci") or (None, None)
            rows.append({"ts": ts, "model_run": model_run, "sensor": name, "value": _num(r.get("value")),
                         "p_value": _num(r.get("p_value")), "ci_lo": _num(ci[0]), "ci_hi": _num(ci[1]),
                         "baseline": _num(r.get("baseline")), "status": r.get("status")})
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def series(self) -> dict[str, list[dict[str, Any]]]:
        """{sensor: [{ts, value, p_value, ci_lo, ci_hi, baseline, status, model_run}, ...]} oldest first."""
        from sqlalchemy import select

        out: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(select(self.table).order_by(self.table.c.id)):
                out.setdefault(r.sensor, []).append(dict(r._mapping))
        return out


def _num(x) -> float | None:
    return None if x is None else float(x)


def plot_signals(series: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """One panel per sensor: the judged value per watch, its interval, its baseline, and the watches
    where it fired (red) or lacked data (grey); saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series) or ["(no watches yet)"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.9 * len(names)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names):
        points = series.get(name, [])
        x = list(range(1, len(points) + 1))
        vals = [p["value"] for p in points]
        ax.plot([i for i, v in zip(x, vals) if v is not None], [v for v in vals if v is not None], "o-", ms=3)
        band = [(i, p) for i, p in zip(x, points) if p["ci_lo"] is not None and p["value"] is not None]
        if band:
            # The interval is of (rate - baseline); shown around the baseline it reads as the rate's range.
            ax.fill_between([i for i, _ in band], [p["baseline"] + p["ci_lo"] for _, p in band],
                            [p["baseline"] + p["ci_hi"] for _, p in band], alpha=0.2)
        base = [(i, p["baseline"]) for i, p in zip(x, points) if p["baseline"] is not None]
        if base:
            ax.plot(*zip(*base), "--", color="grey", lw=1)
        for i, p in zip(x, points):
            if p["status"] == "drift" and p["value"] is not None:
                ax.plot(i, p["value"], "o", color="red", ms=6)
            elif p["status"] == "not enough data":
                ax.axvline(i, color="grey", alpha=0.3, lw=4)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("watch", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
