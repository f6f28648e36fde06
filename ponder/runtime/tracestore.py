"""The local trace store: why each decision happened, and why nothing happened elsewhere.

One SQLite file (stdlib `sqlite3`) beside the output of a file run or the state of a worker.
Three tables:

- `decisions`: each decision as emitted (its wire record, trace included), the triggering
  event, and its `Explanation` (operators/reason.py): the prompt as sent, each call's raw
  output and validation;
- `calls`: one row per model call (tier, model, tokens, USD), for cost by the tier and model
  that were paid, failed calls included;
- `gate_blocks`: every observed event's verdict (event time, score, escalated, the top
  findings, and its payload when small, else its numbers: the raw signal `ponder ui` plots
  is picked out of it when read), so "why was nothing
  decided here?" has an answer. One row holds one key's verdicts of one flush as a JSON
  array (at most BLOCK_ROWS): an event costs one tuple append on the event path and one
  JSON encoding at the flush, where a SQLite row (and index entry) per event cost ~9 µs. The
  view `gates` shows them one row per event, for SQL.

Writes are buffered and go in one transaction at each checkpoint (or every `flush_every`
rows). The store is bounded by age (rows recorded more than `max_age_s` ago are dropped) and
by size (past `max_bytes`, the oldest rows go first).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ponder.types import DEFAULT_TENANT, TENANT_SEP, Decision, Event

if TYPE_CHECKING:
    from ponder.operators.gate import Verdict
    from ponder.operators.privacy import Privacy
    from ponder.operators.reason import Explanation

__all__ = [
    "GateRow",
    "StoredDecision",
    "TimelineGate",
    "TraceStore",
    "cost_report",
    "explain_doc",
    "ledger_report",
    "parse_time",
]

logger = logging.getLogger(__name__)

MIN_BYTES = 64 << 10  # below this the schema alone would not fit
TOP_FINDINGS = 3
SIGNAL_FIELDS = 16  # numeric fields kept per gate row: a wide payload must not bloat the store
BLOCK_ROWS = 512  # verdicts per gate block: the unit a reader decodes and the size bound drops
ROW_BYTES = 512  # a block whose rows average past this keeps their numbers only (log lines are not signals)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, pipeline TEXT, key TEXT, tenant TEXT, ts REAL, wall REAL,
    tier TEXT, model TEXT, action TEXT, cost_usd REAL,
    decision BLOB, event BLOB, explanation BLOB);
CREATE INDEX IF NOT EXISTS decisions_key_ts ON decisions (key, ts);
CREATE TABLE IF NOT EXISTS calls (
    decision_id TEXT, ts REAL, wall REAL, tenant TEXT, key TEXT, action TEXT, tier TEXT,
    model TEXT, prompt_tokens INTEGER, cached_prompt_tokens INTEGER, completion_tokens INTEGER,
    cost_usd REAL);
CREATE TABLE IF NOT EXISTS gate_blocks (
    key TEXT, tenant TEXT, ts_lo REAL, ts_hi REAL, wall REAL, n INTEGER, escalated INTEGER,
    rows TEXT);  -- JSON: [[ts, score, escalated, reasons, payload | {field: number} | null], ...]
CREATE INDEX IF NOT EXISTS gate_blocks_key_ts ON gate_blocks (key, ts_hi);
"""
_GATES_VIEW = """
CREATE VIEW IF NOT EXISTS gates AS
SELECT b.key AS key, b.tenant AS tenant, json_extract(r.value, '$[0]') AS ts, b.wall AS wall,
       json_extract(r.value, '$[1]') AS score, json_extract(r.value, '$[2]') AS escalated,
       json_extract(r.value, '$[3]') AS reasons, json_extract(r.value, '$[4]') AS payload,
       b.rowid AS block, r.key AS seq
FROM gate_blocks b, json_each(b.rows) r;
"""
_TABLES = ("gate_blocks", "calls", "decisions")


class StoredDecision(msgspec.Struct, frozen=True):
    """A decision as the store holds it."""

    decision: Decision
    event: dict[str, Any] | None  # None: withheld (a privacy policy was in force)
    explanation: dict[str, Any] | None  # None: the decision made no model call worth keeping
    recorded: float  # wall clock (UNIX seconds) when it was stored
    pipeline: str = ""


class GateRow(msgspec.Struct, frozen=True):
    key: str
    tenant: str
    ts: float
    score: float
    escalated: bool
    reasons: str


class TimelineGate(msgspec.Struct, frozen=True):
    """One gate row as the page plots it: `signal` is the event's numeric fields (after the
    privacy policy), empty when none were kept."""

    ts: float
    score: float
    escalated: bool
    reasons: str
    signal: dict[str, float]


class _Block:
    """One key's verdicts since the last flush: (ts, score, escalated, reasons, payload or
    numbers or None)."""

    __slots__ = ("key", "rows", "tenant")

    def __init__(self, key: str, tenant: str) -> None:
        self.key, self.tenant = key, tenant
        self.rows: list[tuple] = []


class TraceStore:
    """Append decisions and gate verdicts; read them back for `ponder explain` and `ponder costs`."""

    def __init__(self, path: str | Path, *, max_bytes: int = 256 << 20, max_age_s: float = 7 * 86400.0,
                 flush_every: int = 20_000, pipeline: str = "", keep_payloads: bool = True,
                 clock: Callable[[], float] = time.time, readonly: bool = False) -> None:
        if max_bytes < MIN_BYTES:
            msg = f"a trace store needs max_bytes >= {MIN_BYTES}, got {max_bytes}"
            raise ValueError(msg)
        if max_age_s <= 0:
            msg = f"a trace store needs max_age_s > 0, got {max_age_s}"
            raise ValueError(msg)
        self.path = Path(path)
        self.max_bytes, self.max_age_s, self.flush_every = max_bytes, max_age_s, flush_every
        self.pipeline, self.keep_payloads, self.clock = pipeline, keep_payloads, clock
        if readonly and not self.path.exists():
            msg = f"no trace store at {str(self.path)!r}"
            raise FileNotFoundError(msg)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # a reader (ponder explain) may open it while a worker writes: WAL lets both go on
        try:
            self.db = sqlite3.connect(self.path, timeout=10.0)
        except sqlite3.Error as e:
            msg = f"cannot open the trace store {str(self.path)!r}: {e}"
            raise ValueError(msg) from e
        try:
            if not readonly:
                self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file
                self.db.execute("PRAGMA journal_mode=WAL")
                # traces are diagnostics, not committed state: a crash may lose the last flush
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
            self.db.execute("SELECT 1 FROM decisions LIMIT 1")
            self._upgrade()
        except sqlite3.DatabaseError as e:
            self.db.close()
            msg = f"{str(self.path)!r} is not a ponder trace store: {e}"
            raise ValueError(msg) from e
        # each key's verdicts since the last flush (split into BLOCK_ROWS rows when written)
        self._open: dict[str, _Block] = {}
        self._pending = 0
        self._enc = msgspec.json.Encoder()
        # set by the worker with a privacy policy: the signal kept is what the policy lets through
        self.privacy: Privacy | None = None
        self._decisions: list[tuple] = []
        self._calls: list[tuple] = []

    # -- writing -----------------------------------------------------------------------------

    def gate(self, ev: Event, verdict: Verdict) -> None:
        """Record one observed event's verdict: a tuple in its key's open block, encoded at
        the flush (its recording time is the flush's, a checkpoint interval late at most).
        The row holds the payload itself when payloads are kept (the signal is picked out
        when read), else only the numbers a privacy policy lets through."""
        # by the event's key alone: a tenant's keys carry its name (types.Event), so it is one
        # tenant's; the tuple append is all the event path pays
        block = self._open.get(ev.key)
        if block is None:
            block = self._open[ev.key] = _Block(_stream_key(ev), ev.tenant or DEFAULT_TENANT)
        v = verdict
        block.rows.append((ev.ts, v.score, v.escalate, _reasons(v) if v.findings else v.reason,
                           ev.payload if self.keep_payloads else self._withheld_signal(ev) or None))
        self._pending += 1
        if self._pending >= self.flush_every:
            self.checkpoint()

    def decision(self, d: Decision, ev: Event, explanation: Explanation | None) -> None:
        wall = self.clock()
        event = {"key": d.key, "tenant": d.tenant, "ts": ev.ts, "source": str(ev.source),
                 "payload": ev.payload if self.keep_payloads else None, "headers": ev.headers}
        try:
            raw = msgspec.json.encode(event)
        except (TypeError, ValueError):  # a custom source's payload JSON cannot hold: shown as text
            raw = msgspec.json.encode({**event, "payload": repr(ev.payload)[:2000]})
        self._decisions.append((d.decision_id, self.pipeline, d.key, d.tenant, d.ts, wall, d.tier, d.model,
                                d.action, d.usage.cost_usd, msgspec.json.encode(d), raw,
                                msgspec.json.encode(explanation) if explanation is not None else None))
        for a in explanation.attempts if explanation is not None else ():
            u = a.usage
            self._calls.append((d.decision_id, d.ts, wall, d.tenant, d.key, d.action, a.tier, a.model,
                                u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens, u.cost_usd))
        if len(self._decisions) >= self.flush_every:
            self.checkpoint()

    def flush(self) -> None:
        """Write what is buffered in one transaction, then enforce the bounds."""
        if not (self._pending or self._decisions):
            return
        wall = self.clock()
        blocks = []
        for b in self._open.values():
            for i in range(0, len(b.rows), BLOCK_ROWS):
                rows = b.rows[i:i + BLOCK_ROWS]
                ts = [r[0] for r in rows]
                blocks.append((b.key, b.tenant, min(ts), max(ts), wall, len(ts), sum(r[2] for r in rows),
                               self._encode(rows)))
        with self.db:
            self.db.executemany("INSERT INTO gate_blocks VALUES (?,?,?,?,?,?,?,?)", blocks)
            # a replayed event decides again with the same id: the latest record stands
            self.db.executemany("INSERT OR REPLACE INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                self._decisions)
            self.db.executemany("INSERT INTO calls VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", self._calls)
        self._drop_buffers()
        self.prune()

    def _encode(self, rows: list[tuple]) -> str:
        """A block's rows as JSON. Rows that average past ROW_BYTES (log lines, blobs), and
        payloads JSON cannot hold, keep their numbers only: a store of signals, not of data."""
        try:
            text = self._enc.encode(rows)
            if len(text) <= ROW_BYTES * len(rows):
                return text.decode()
        except (TypeError, ValueError):  # a custom source's payload (odd names or values)
            pass
        if not self.keep_payloads:  # numbers already, with text names
            return self._enc.encode(rows).decode()
        return self._enc.encode([(*r[:4], _numeric(r[4], r[0]) or None) for r in rows]).decode()

    def _withheld_signal(self, ev: Event) -> dict[str, float]:
        """The numeric fields a store that keeps no payloads may hold: with a privacy policy
        what it keeps or coarsens to a number, else none."""
        if self.privacy is None:
            return {}
        return _allowed(self.privacy, ev.tenant, _numeric(ev.payload, ev.ts))

    def _upgrade(self) -> None:
        """Move a store written one SQLite row per verdict (table `gates`) into gate blocks
        (one block per old row), and (re)create the `gates` view."""
        kind = self.db.execute("SELECT type FROM sqlite_master WHERE name = 'gates'").fetchone()
        if kind is not None and kind[0] == "table":
            self.db.executescript(_SCHEMA)
            cols = {row[1] for row in self.db.execute("PRAGMA table_info(gates)")}
            signal = "json(signal)" if "signal" in cols else "NULL"
            with self.db:
                self.db.execute(
                    "INSERT INTO gate_blocks SELECT key, tenant, ts, ts, wall, 1, escalated, "
                    f"json_array(json_array(ts, score, escalated, reasons, {signal})) FROM gates ORDER BY rowid")
                self.db.execute("DROP TABLE gates")
        if kind is None or kind[0] == "table":
            self.db.executescript(_GATES_VIEW)

    def checkpoint(self) -> None:
        """Flush for a running worker: a store that cannot be written (a full disk) is logged
        and its buffered rows dropped, never allowed to stop the stream it describes."""
        try:
            self.flush()
        except (sqlite3.Error, OSError) as e:
            logger.warning("trace store %s: dropping %d records: %s: %s", self.path,
                           self._pending + len(self._decisions), type(e).__name__, e)
            self._drop_buffers()

    def _drop_buffers(self) -> None:
        self._open, self._pending = {}, 0
        self._decisions, self._calls = [], []

    def prune(self) -> None:
        """Drop rows older than `max_age_s`, then the oldest rows until the file fits `max_bytes`."""
        cutoff = self.clock() - self.max_age_s
        with self.db:
            for t in _TABLES:
                # rows go in in wall-clock order: the first young row bounds the old ones
                row = self.db.execute(f"SELECT rowid FROM {t} WHERE wall >= ? ORDER BY rowid LIMIT 1",
                                      (cutoff,)).fetchone()
                if row is None:
                    self.db.execute(f"DELETE FROM {t}")
                else:
                    self.db.execute(f"DELETE FROM {t} WHERE rowid < ?", (row[0],))
        self.db.executescript("PRAGMA incremental_vacuum;")  # run to its end: the file shrinks
        for _ in range(20):  # each round drops a fifth of every table's oldest rows
            if self.size() <= self.max_bytes:
                break
            with self.db:
                for t in _TABLES:
                    (n,) = self.db.execute(f"SELECT count(*) FROM {t}").fetchone()
                    self.db.execute(f"DELETE FROM {t} WHERE rowid IN "
                                    f"(SELECT rowid FROM {t} ORDER BY rowid LIMIT ?)", (max(1, n // 5),))
            self.db.executescript("PRAGMA incremental_vacuum;")  # run to its end: the file shrinks

    def size(self) -> int:
        """Bytes the store's pages hold (its file size once the write-ahead log is merged)."""
        (pages,) = self.db.execute("PRAGMA page_count").fetchone()
        (free,) = self.db.execute("PRAGMA freelist_count").fetchone()
        (page,) = self.db.execute("PRAGMA page_size").fetchone()
        return (pages - free) * page

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()

    # -- reading -----------------------------------------------------------------------------

    def get(self, decision_id: str) -> StoredDecision | None:
        row = self.db.execute("SELECT decision, event, explanation, wall, pipeline FROM decisions "
                              "WHERE decision_id = ?", (decision_id,)).fetchone()
        if row is None:
            return None
        dec, event, expl, wall, pipeline = row
        event = msgspec.json.decode(event)
        return StoredDecision(msgspec.json.decode(dec, type=Decision),
                              event, msgspec.json.decode(expl) if expl is not None else None, wall, pipeline or "")

    def around(self, key: str, ts: float, window_s: float, tenant: str | None = None
               ) -> tuple[list[GateRow], list[Decision]]:
        """The gate verdicts and decisions of `key` with event time within `window_s` of `ts`."""
        lo, hi = ts - window_s, ts + window_s
        q = "SELECT tenant, rows FROM gate_blocks WHERE key = ? AND ts_hi >= ? AND ts_lo <= ?"
        args: list[Any] = [key, lo, hi]
        if tenant is not None:
            q += " AND tenant = ?"
            args.append(tenant)
        gates = [GateRow(key, t, r[0], r[1], bool(r[2]), r[3])
                 for t, text in self.db.execute(q + " ORDER BY rowid", args)
                 for r in _decode_rows(text) if lo <= r[0] <= hi]
        gates.sort(key=lambda g: g.ts)  # stable: rows of one time keep their arrival order
        q = "SELECT decision FROM decisions WHERE key = ? AND ts BETWEEN ? AND ?"
        args = [key, lo, hi]
        if tenant is not None:
            q += " AND tenant = ?"
            args.append(tenant)
        decisions = [msgspec.json.decode(b, type=Decision) for (b,) in self.db.execute(q + " ORDER BY ts", args)]
        return gates, decisions

    def decisions_after(self, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """The stream of decisions as stored: those with a row id past `after`, oldest first (a
        replayed decision is stored again, under a new row id)."""
        q = ("SELECT rowid, decision_id, key, tenant, ts, tier, model, action, cost_usd, decision "
             "FROM decisions WHERE rowid > ? ORDER BY rowid LIMIT ?")
        out = []
        for rowid, did, key, tenant, ts, tier, model, action, usd, raw in self.db.execute(q, (after, limit)):
            d = msgspec.json.decode(raw, type=Decision)
            out.append({"rowid": rowid, "decision_id": did, "key": key, "tenant": tenant, "ts": ts, "tier": tier,
                        "model": model, "action": action, "severity": d.severity, "reason": d.reason,
                        "cost_usd": usd})
        return out

    def keys(self, limit: int = 500) -> list[dict[str, Any]]:
        """(tenant, key) pairs seen by the gate, the most recently recorded first."""
        q = ("SELECT tenant, key, sum(n), max(rowid) FROM gate_blocks GROUP BY tenant, key "
             "ORDER BY max(rowid) DESC LIMIT ?")
        return [{"tenant": t, "key": k, "events": n} for t, k, n, _ in self.db.execute(q, (limit,))]

    def timeline(self, key: str, tenant: str | None = None, limit: int = 2000
                 ) -> tuple[list[TimelineGate], list[Decision]]:
        """A key's last `limit` gate rows (by event time) and the decisions in their time span,
        oldest first."""
        q = "SELECT rows, n FROM gate_blocks WHERE key = ?"
        args: list[Any] = [key]
        if tenant is not None:
            tenant = tenant or DEFAULT_TENANT
            # stores written before gate rows named the default tenant hold "" for it
            q += " AND tenant IN (?, ?)"
            args += [tenant, "" if tenant == DEFAULT_TENANT else tenant]
        rows: list[list] = []
        for text, n in self.db.execute(q + " ORDER BY ts_hi DESC, rowid DESC", args):
            rows[:0] = _decode_rows(text)
            if len(rows) - n >= limit:  # one block past the limit: a late event may reach back into it
                break
        rows.sort(key=lambda r: r[0])
        gates = [TimelineGate(r[0], r[1], bool(r[2]), r[3], _numeric(r[4], r[0]) if r[4] else {})
                 for r in rows[-limit:]]
        q = "SELECT decision FROM decisions WHERE key = ?"
        args = [key]
        if tenant is not None:
            q += " AND tenant = ?"
            args.append(tenant)
        if gates:
            q += " AND ts >= ?"
            args.append(gates[0].ts)
        decisions = [msgspec.json.decode(b, type=Decision) for (b,) in self.db.execute(q + " ORDER BY ts", args)]
        return gates, decisions

    def cost_rows(self, since: float | None = None, until: float | None = None) -> Iterator[tuple]:
        """(decision id, tenant, tier, model, action, key, prompt, cached, completion, usd) per
        call whose triggering event's time is within [since, until]."""
        q = ("SELECT decision_id, tenant, tier, model, action, key, prompt_tokens, cached_prompt_tokens, "
             "completion_tokens, cost_usd FROM calls WHERE ts >= ? AND ts <= ?")
        yield from self.db.execute(q, (since if since is not None else float("-inf"),
                                       until if until is not None else float("inf")))

    def counts(self) -> dict[str, int]:
        """Rows per kind: gate verdicts, model calls, decisions."""
        (gates,) = self.db.execute("SELECT coalesce(sum(n), 0) FROM gate_blocks").fetchone()
        return {"gates": gates, **{t: self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                                   for t in ("calls", "decisions")}}


def _stream_key(ev: Event) -> str:
    return ev.key[len(ev.tenant) + 1:] if ev.tenant and ev.key.startswith(ev.tenant + TENANT_SEP) else ev.key


def _numeric(payload: dict[str, Any], ts: float) -> dict[str, float]:
    """Up to SIGNAL_FIELDS finite numbers of a payload; a field equal to the event time is the
    plot's x axis, not a signal."""
    out: dict[str, float] = {}
    for name, v in payload.items():
        t = type(v)  # exact types first: this runs for every event at each flush
        if t is float:
            if v != ts and v - v == 0.0:  # finite: inf - inf and nan - nan are nan
                out[str(name)] = v
        elif t is int:
            if v != ts:
                out[str(name)] = float(v)
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v != ts:
            out[str(name)] = float(v)  # subclasses (numpy scalars from a custom source)
        else:
            continue
        if len(out) == SIGNAL_FIELDS:
            break
    return out


def _allowed(privacy: Privacy, tenant: str, fields: dict[str, float]) -> dict[str, float]:
    """The numeric fields a privacy policy lets a trace hold: kept ones as they are, coarsened
    ones coarsened; dropped, masked and hashed ones (no longer numbers) are left out, and so is a
    field whose name holds PII the policy replaces."""
    from ponder.operators.pii import Placeholders

    if not fields:
        return fields
    kept, _ = privacy.payload(tenant, fields, Placeholders())
    return {k: float(v) for k, v in kept.items()
            if k in fields and isinstance(v, int | float) and not isinstance(v, bool)}


def _decode_rows(text: str) -> list[list]:
    return msgspec.json.decode(text)


def _reasons(v: Verdict) -> str:
    """The verdict's top findings, most surprising first: "spike temp 0.93; rule * 0.40 (hot)"."""
    if not v.findings:  # most events: nothing surprising
        return v.reason
    top = sorted(v.findings, key=lambda f: -f.score)[:TOP_FINDINGS] if len(v.findings) > 1 else v.findings
    return "; ".join(f"{f.kind} {f.field} {f.score:.2f}" + (f" ({f.detail})" if f.detail else "")
                     for f in top) or v.reason


def parse_time(text: str) -> float:
    """UNIX seconds from a number or an ISO 8601 time (UTC unless it says otherwise)."""
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)  # "Z" too, since Python 3.11
    except ValueError:
        msg = f"{text!r} is neither UNIX seconds nor an ISO 8601 time"
        raise ValueError(msg) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


# -- reports (ponder explain, ponder costs): plain data, rendered by the CLI --------------------


def explain_doc(sd: StoredDecision) -> dict[str, Any]:
    """Everything the store knows about one decision, in the order a reader asks for it."""
    d, t = sd.decision, sd.decision.trace
    u = d.usage
    doc: dict[str, Any] = {
        "decision_id": d.decision_id, "pipeline": sd.pipeline, "recorded": sd.recorded,
        "decision": {k: getattr(d, k) for k in ("key", "tenant", "action", "severity", "reason", "confidence",
                                                "tier", "model", "degraded", "ts", "latency_ms")},
        "event": sd.event,
        "gate": {"score": t.gate_score if t else None,
                 "findings": msgspec.to_builtins(t.findings) if t else []},
        "privacy": t.privacy if t else None,
        "prompt": ({"prefix": sd.explanation["prefix"], "tail": sd.explanation["tail"]}
                   if sd.explanation is not None else None),
        "tokens": {"prompt": u.prompt_tokens, "cached": u.cached_prompt_tokens,
                   "new": u.prompt_tokens - u.cached_prompt_tokens, "completion": u.completion_tokens,
                   "estimated": u.estimated},
        "cost_usd": u.cost_usd,
        "predicted": msgspec.to_builtins(t.predicted) if t and t.predicted else None,
        "route": t.route if t else [],
        "steps": [s.attrs for s in (t.stages if t else []) if s.name == "route"],
        "skipped": t.skipped if t else [],
        "errors": t.errors if t else [],
        "vote": t.vote if t else None,
        "attempts": [],
        "stages": _stages(t) if t else [],
    }
    for a in (sd.explanation or {}).get("attempts", []):
        texts, errs = a.get("texts", []), a.get("errors", [])
        doc["attempts"].append({
            "tier": a["tier"], "model": a.get("model", ""), "samples": a.get("samples", 1),
            "repair": a.get("repair", ""), "failure": a.get("failure", ""), "usage": a.get("usage", {}),
            "outputs": [{"text": x, "error": errs[i] if i < len(errs) else None} for i, x in enumerate(texts)]})
    return doc


def _stages(t: Any) -> list[dict[str, Any]]:
    """The reasoner's stages and its calls (with their parts) on one timeline: (depth, name, start, ms)."""
    out: list[dict[str, Any]] = []

    def walk(span: Any, depth: int) -> None:
        out.append({"depth": depth, "name": span.name, "start_ms": span.start_ms, "ms": span.ms,
                    "attrs": span.attrs})
        for p in span.parts:
            walk(p, depth + 1)

    for s in sorted([*t.stages, *t.spans], key=lambda s: s.start_ms):
        walk(s, 0)
    return out


_GROUPS = ("tenant", "tier", "model", "action", "key")


def cost_report(rows: Iterator[tuple], top: int = 10) -> dict[str, Any]:
    """Spend by tenant, tier, model, action and key (the `top` dearest) from per-call rows
    (TraceStore.cost_rows). Tier and model are the ones called (failed calls are paid too);
    action and key are the decision's."""
    groups: dict[str, dict[str, dict[str, Any]]] = {g: {} for g in _GROUPS}
    total = {"decisions": 0, "calls": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
             "completion_tokens": 0, "usd": 0.0}
    seen: dict[str, set[str]] = {g: set() for g in (*_GROUPS, "total")}
    for did, *names, p, c, o, usd in rows:
        names[-1] = (names[0], names[-1])  # a key is one tenant's: (tenant, key)
        for g, name, acc in [*((g, n, groups[g]) for g, n in zip(_GROUPS, names)), ("total", "", None)]:
            row = total if acc is None else acc.setdefault(name, {
                **({"tenant": name[0], "key": name[1]} if g == "key" else {g: name}), "decisions": 0, "calls": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                "completion_tokens": 0, "usd": 0.0})
            row["calls"] += 1
            row["prompt_tokens"] += p
            row["cached_prompt_tokens"] += c
            row["completion_tokens"] += o
            row["usd"] += usd
            if (name, did) not in seen[g]:  # a decision counts once per group it paid into
                seen[g].add((name, did))
                row["decisions"] += 1
    report: dict[str, Any] = {"total": total}
    for g in _GROUPS:
        ranked = sorted(groups[g].values(), key=lambda r: (-r["usd"], str(r[g])))
        report[f"by_{g}"] = ranked[:top] if g == "key" else ranked
    return report


def ledger_report(doc: dict[str, Any]) -> dict[str, Any]:
    """Spend by tenant and tier from a ledger (runtime/ledger.py); a ledger keeps no model,
    action or key, and no times."""
    total = {"calls": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
    groups: dict[str, dict[str, dict[str, Any]]] = {"tenant": {}, "tier": {}}
    for r in doc.get("spend", []):
        for g in ("tenant", "tier", None):
            row = total if g is None else groups[g].setdefault(r[g], {g: r[g], **dict.fromkeys(total, 0)})
            for k in total:
                row[k] += r.get(k, 0)
    return {"total": total, "pipeline": doc.get("pipeline", ""), "updated": doc.get("updated", ""),
            **{f"by_{g}": sorted(v.values(), key=lambda r: (-r["usd"], r[g])) for g, v in groups.items()}}
