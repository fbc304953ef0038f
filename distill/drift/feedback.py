"""Gold labels that arrive after the answer (`distill feedback`): written into the traffic log's
`gold` column, where the accuracy_drop sensor reads them.

Every row of the file is checked first (known request id, known label, no conflicting
duplicate); one bad row rejects the whole file, naming its line, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from distill.config import ConfigError
from distill.data import read_table


def read_feedback(path: str | Path, labels: Sequence[str] | None, id_field: str = "request_id",
                  label_field: str = "label") -> dict[str, str]:
    """{request_id: gold label} from a CSV/JSONL file; errors name the file and line."""
    out: dict[str, str] = {}
    known = set(labels) if labels else None
    for row in read_table(path, [id_field, label_field]):
        rid, label = str(row[id_field] or "").strip(), str(row[label_field] or "").strip()
        where = f"{path}:{row['_line']}"
        if not rid or not label:
            raise ConfigError(f"{where}: empty {id_field if not rid else label_field}")
        if known is not None and label not in known:
            raise ConfigError(f"{where}: label {label!r} is not one of the task's labels")
        if out.get(rid, label) != label:
            raise ConfigError(f"{where}: request {rid} already has gold {out[rid]!r} earlier in the file")
        out[rid] = label
    return out


def apply_feedback(log, gold: dict[str, str], source: str) -> int:
    """Write the gold labels into `log` (a ShadowLog) in one transaction; returns the rows updated.

    Raises ConfigError, writing nothing, when a request id is not in the log.
    """
    from sqlalchemy import bindparam, select

    t = log.requests
    ids = list(gold)
    found: set[str] = set()
    with log.engine.connect() as conn:
        for i in range(0, len(ids), 500):
            found.update(r[0] for r in conn.execute(select(t.c.request_id).where(t.c.request_id.in_(ids[i:i + 500]))))
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} request id(s) not in the traffic log, e.g. "
                          f"{', '.join(unknown[:3])}; nothing was written")
    stmt = t.update().where(t.c.request_id == bindparam("rid")).values(gold=bindparam("g"))
    with log._lock, log.engine.begin() as conn:
        conn.execute(stmt, [{"rid": k, "g": v} for k, v in gold.items()])
    return len(gold)
