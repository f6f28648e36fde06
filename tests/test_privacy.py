"""Privacy (operators/privacy.py, inference/egress.py): what leaves the process is only what the
policy lets through. Field policies end to end, as the remote engine receives them; residency
(local-only tenants, keys and fields reach only local tiers, sticky per key); the one door in
front of every remote engine (who may construct one, what the pipeline wraps, what it refuses
without a byte sent); pseudonyms on the wire; and a capture of every byte sent to a loopback
server while a stream full of generated personal data and secrets runs through a pipeline.
"""

from __future__ import annotations

import ast
import asyncio
import ipaddress
import json
import re
import socket
import threading
from pathlib import Path

import msgspec
import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_script_server import ScriptedOpenAIServer, chat_reply
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

import ponder
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.egress import REFUSED, Egress
from ponder.inference.engine import Completion, Request
from ponder.inference.openai import OpenAIEngine
from ponder.inference.reflex import ReflexEngine
from ponder.inference.registry import build_engine
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.pii import (
    ALL,
    CARD,
    EMAIL,
    GPS,
    IBAN,
    IP,
    PHONE,
    SECRET,
    SSN,
    Placeholders,
)
from ponder.operators.privacy import KEY_ENV, KEY_FILE_ENV, FieldRule, Policy, Privacy
from ponder.operators.route import SKIP_RESIDENCY, TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.worker import Worker
from ponder.state.memory import MemoryStore
from ponder.types import TENANT_SEP, Finding, Usage

KEY = b"test-privacy-key"
ANSWER = json.dumps({"action": "alert", "severity": "high", "reason": "r", "confidence": 0.9})
REMOTE = "http://127.0.0.1:9/v1"  # never dialled: the tests hand the tier a recording engine
RESIDENCY = f"edge: {SKIP_RESIDENCY}"


class Recorder:
    """A model tier that keeps every request it is handed and answers `action` at once."""

    name = "recorder"

    def __init__(self, action: str = "alert") -> None:
        self.requests: list[Request] = []
        self.answer = ANSWER.replace('"alert"', json.dumps(action))

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(self.answer, Usage(10, 0, 5), "rec") for _ in requests]


def pipeline(privacy: Privacy | None, *, tenant: str | None = None, tiers=None, gate=None) -> Pipeline:
    """Every event escalates (a rule that always fires, re-notified each time) to the edge."""
    return Pipeline(
        name="priv", key="k", time="ts", actions=("none", "alert"), tenant=tenant, privacy=privacy,
        gate=gate or GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0, rules=(Rule("flag", lambda e: True),)),
        tiers=tiers or (TierSpec("reflex", max_batch=1),
                        TierSpec("edge", engine=REMOTE, min_score=0.5, max_batch=1)))


async def run(pipe: Pipeline, items, engines=None) -> tuple[list, dict]:
    """The decisions (in input order, none lost to dead letters) and the tiers' engines."""
    logic, decoder, built = pipe.build(engines=engines)
    sink = MemorySink()
    await Worker(logic, decoder, MemorySource(items), sink, built, pipe.tiers).run()
    assert sink.dead_letters == []
    return sorted(sink.decisions, key=lambda d: d.source.offset), built


def prompt(r: Request) -> str:
    return r.prefix + r.tail


# -- 1. field policies, as the remote engine receives them ----------------------------------

RULES = (
    FieldRule("ssn", "drop"),
    FieldRule("diag*", "mask"),
    FieldRule("acct", "hash"),
    FieldRule("temp", "coarsen", step=10),
    FieldRule("pos", "coarsen", step=0.01),
    FieldRule("seen", "coarsen", step=3600),
    FieldRule("card_*", "mask"),
    FieldRule("card_last4", "keep"),  # shadowed: the first rule that matches wins
)
EVENT = {"ssn": "536-90-4399", "diag_code": "F32.1-confidential", "temp": 1234.567, "pos": [48.858370, -2.294481],
         "seen": "2024-05-01T10:17:42+02:00", "card_last4": "8842", "site": "north"}


async def test_each_field_action_shapes_what_the_remote_engine_receives():
    rec = Recorder()
    accts = ["ACC-1001", "ACC-2002", "ACC-1001"]
    items = [{"k": "dev-1", "ts": 1000.0 + i, **EVENT, "acct": a} for i, a in enumerate(accts)]
    decisions, _ = await run(pipeline(Privacy(default=Policy(fields=RULES), key=KEY)), items, {"edge": rec})
    assert [d.tier for d in decisions] == ["edge"] * 3 and len(rec.requests) == 3
    first, last = prompt(rec.requests[0]), prompt(rec.requests[-1])
    # drop: neither the name nor the value
    assert "536-90-4399" not in last and '"ssn"' not in last
    # mask: the field is there, its value is not (and the first rule won over card_last4's keep)
    assert '"diag_code"="[masked]"' in first and "F32.1" not in last
    assert '"card_last4"="[masked]"' in first and "8842" not in last
    # coarsen: exact buckets (temp to 10, GPS to 0.01 degrees, the time to its UTC hour)
    assert '"temp"=1230 ' in first and "1234" not in last and "1235" not in last
    assert '"pos"="[48.85,-2.3]"' in first and "48.858" not in last and "2.294" not in last
    assert '"seen"="2024-05-01T08:00:00Z"' in first and "10:17" not in last and "08:17" not in last
    # hash: a stable keyed digest per value, equal for equal values, never the value
    lines = [ln for ln in rec.requests[-1].prefix.splitlines() if '"acct"=' in ln]
    digests = [re.search(r'"acct"="(h:[0-9a-f]{16})"', ln)[1] for ln in lines]
    assert len(digests) == 3 and digests[0] == digests[2] != digests[1] and "ACC-" not in last
    assert '"site"="north"' in first  # unmatched fields are kept
    # the trace names fields and actions, never values
    assert decisions[0].trace.privacy == {"ssn": "drop", "diag_code": "mask", "temp": "coarsen", "pos": "coarsen",
                                          "seen": "coarsen", "card_last4": "mask", "acct": "hash"}
    exported = msgspec.json.encode(decisions).decode()
    for raw in ("536-90-4399", "F32.1", "8842", "1234.5", "48.858", "10:17:42", "ACC-"):
        assert raw not in exported


def test_coarsen_buckets_are_exact():
    priv = Privacy(default=Policy(fields=(FieldRule("n", "coarsen", step=0.1), FieldRule("i", "coarsen", step=5),
                                          FieldRule("g", "coarsen", step=0.01), FieldRule("t", "coarsen", step=900),
                                          FieldRule("*", "coarsen", step=1))))
    out, applied = priv.payload("default", {
        "n": 0.3, "i": 17, "g": {"lat": -33.86882, "lon": 151.20929}, "t": "2024-02-29T23:59:59.9-00:30",
        "neg": -0.5, "text": "not a time", "flag": True, "none": None, "year0": "0001-01-01T00:00:00+05:00"},
        Placeholders())
    assert out == {"n": 0.3, "i": 15, "g": {"lat": -33.87, "lon": 151.2}, "t": "2024-03-01T00:15:00Z",
                   "neg": -1.0, "text": "[masked]", "flag": "[masked]", "none": None, "year0": "[masked]"}
    assert applied.changes == {name: "coarsen" for name in out} and applied.local is False


async def test_a_tenant_override_replaces_the_default_policy():
    rec = Recorder()
    priv = Privacy(default=Policy(fields=(FieldRule("ssn", "drop"),)),
                   tenants={"clinic": Policy(fields=(FieldRule("ssn", "keep"), FieldRule("name", "mask")))})
    items = [{"k": "p", "org": org, "ts": 1.0, "ssn": f"536-90-43{i}9", "name": "Ada"}
             for i, org in enumerate(("bank", "clinic"))]
    decisions, _ = await run(pipeline(priv, tenant="org"), items, {"edge": rec})
    by_tenant = {d.tenant: d for d in decisions}
    assert by_tenant["bank"].trace.privacy == {"ssn": "drop"}
    assert by_tenant["clinic"].trace.privacy == {"name": "mask"}
    bank, clinic = (prompt(r) for r in rec.requests)
    assert "536-90-4309" not in bank and '"name"="Ada"' in bank
    assert '"ssn"="536-90-4319"' in clinic and "Ada" not in clinic


async def test_findings_and_evidence_carry_no_withheld_value():
    rec = Recorder()
    priv = Privacy(default=Policy(fields=(FieldRule("dose", "drop"), FieldRule("weight", "mask"),
                                          FieldRule("balance", "hash"), FieldRule("temp", "coarsen", step=10))),
                   key=KEY)
    names = ("dose", "weight", "balance", "temp", "open")
    items = [{"k": "d", "ts": 1000.0 + i, **{n: 10.0 * (j + 1) + (i % 2) * 0.1 for j, n in enumerate(names)}}
             for i in range(20)]
    spike = {"dose": 987.6, "weight": 876.5, "balance": 765.4, "temp": 654.3, "open": 543.2}
    items.append({"k": "d", "ts": 1020.0, **spike})
    decisions, _ = await run(pipeline(priv, gate=GatePolicy(warmup=5)), items, {"edge": rec})
    (d,) = decisions  # the spike on every field: one escalation
    by_field = {f.field: f for f in d.trace.findings}
    assert set(by_field) == {"[withheld]", "weight", "balance", "temp", "open"}
    assert all(by_field[n].kind == "spike" for n in by_field)
    assert (by_field["[withheld]"].value, by_field["weight"].value, by_field["weight"].detail) == (None, None, "")
    assert by_field["balance"].value.startswith("h:") and by_field["balance"].detail == ""
    assert by_field["temp"].value == 650.0 and by_field["temp"].detail == ""
    assert by_field["open"].value == 543.2 and by_field["open"].detail  # kept: as the gate said
    # evidence: the digest equals the one the prompt shows for that value
    assert d.evidence == {"balance": by_field["balance"].value, "temp": 650.0, "open": 543.2}
    text = prompt(rec.requests[0])
    assert f'"balance"="{by_field["balance"].value}"' in text
    assert '"dose"' not in text and 'spike on "[withheld]"' in text
    for raw in ("987", "876", "765", "654.3"):
        assert raw not in text and raw not in msgspec.json.encode(d).decode()


def test_pii_in_field_names_and_finding_details_is_replaced_in_prompts_and_traces():
    priv = Privacy(default=Policy(pii=ALL, fields=(FieldRule("drop *", "drop"), FieldRule("h *", "hash"))), key=KEY)
    ph = Placeholders()
    out, applied = priv.payload("t", {"drop bob@example.com": "x", "h 10.1.2.3": 5, "note": "call 415-555-0132"}, ph)
    digest = out["h <IP_1>"]
    assert out == {"h <IP_1>": digest, "note": "call <PHONE_1>"} and digest.startswith("h:")
    assert applied.changes == {"drop <EMAIL_1>": "drop", "h <IP_1>": "hash", "note": "pii", "pii:IP": "1",
                               "pii:PHONE": "1"}
    found = priv.findings("t", [
        Finding("new_value", "contact bob@example.com", 0.7, "call +1 415-555-0132", None, "value never seen before"),
        Finding("spike", "drop bob@example.com", 1.0, 5.0, 1.0, "+4 off expected, threshold 2"),
        Finding("spike", "h 10.1.2.3", 1.0, 5.0, 1.0, "+4 off expected, threshold 2"),
        Finding("rule", "*", 1.0, None, None, "flag 10.9.8.7")], ph)
    assert found == [
        Finding("new_value", "contact <EMAIL_1>", 0.7, "call <PHONE_1>", None, "value never seen before"),
        Finding("spike", "[withheld]", 1.0, None, None, ""),
        Finding("spike", "h <IP_1>", 1.0, digest, found[2].expected, ""),  # 5.0 and 5: one digest
        Finding("rule", "*", 1.0, None, None, "flag <IP_2>")]
    assert found[2].expected.startswith("h:") and found[2].expected != digest


def test_a_hash_policy_needs_a_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    hashing = Policy(fields=(FieldRule("acct", "hash"),))
    need = ("this pipeline's privacy policy hashes values or replaces PII, which needs a secret key: "
            "set $PONDER_PRIVACY_KEY or $PONDER_PRIVACY_KEY_FILE (never put the key in the pipeline module)")
    for policy in (hashing, Policy(pii=frozenset({EMAIL}))):
        with pytest.raises(ValueError) as e:
            Privacy(default=policy)
        assert str(e.value) == need
        with pytest.raises(ValueError) as e:
            Privacy(tenants={"t": policy})
        assert str(e.value) == need
    assert Privacy(default=Policy(fields=(FieldRule("acct", "drop"),))).key is None  # nothing to key

    def digest(priv: Privacy) -> str:
        return priv.payload("t", {"acct": "ACC-1"}, Placeholders())[0]["acct"]

    monkeypatch.setenv(KEY_ENV, "from-env")
    from_env = Privacy(default=hashing)
    assert from_env.key == b"from-env"
    secret = tmp_path / "privacy.key"
    secret.write_text("from-file\n")
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(secret))
    from_file = Privacy(default=hashing)
    assert from_file.key == b"from-file"
    assert digest(from_env) != digest(from_file)
    assert digest(from_file) == digest(Privacy(default=hashing, key=b"from-file"))
    secret.write_text("  \n")
    with pytest.raises(ValueError, match=re.escape(f"${KEY_FILE_ENV}={str(secret)!r} is empty")):
        Privacy(default=hashing)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match=re.escape(f"${KEY_FILE_ENV}={str(tmp_path / 'missing.key')!r} "
                                                   "cannot be read: ")):
        Privacy(default=hashing)


@pytest.mark.parametrize(("make", "error"), [
    (lambda: FieldRule("x", "scramble"),
     "FieldRule('x'): action must be keep, drop, mask, hash or coarsen, not 'scramble'"),
    (lambda: FieldRule("x", "coarsen"), "FieldRule('x'): coarsen needs a step > 0"),
    (lambda: FieldRule("x", "coarsen", step=float("nan")), "FieldRule('x'): coarsen needs a step > 0"),
    (lambda: FieldRule("x", "drop", step=5), "FieldRule('x'): step is for coarsen only, not 'drop'"),
    (lambda: FieldRule(""), "FieldRule: match must be a non-empty field name or glob, got ''"),
    (lambda: Policy(pii=frozenset({"NAME"})),
     "Policy.pii: unknown kinds ['NAME']; known: ['SECRET', 'CARD', 'IBAN', 'SSN', 'EMAIL', 'IP', 'GPS', 'PHONE']"),
    (lambda: Policy(pii=ALL, region="XX"),
     "Policy.region: unknown phone region 'XX': use an ISO 3166 code such as 'US' or 'DE'"),
    (lambda: Privacy(key="text"), "Privacy.key must be non-empty bytes, got str"),
])
def test_bad_policies_are_refused_with_a_clear_error(make, error):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == error


# -- 2. residency ----------------------------------------------------------------------------


async def test_a_local_only_tenant_reaches_only_local_tiers():
    rec = Recorder()
    priv = Privacy(tenants={"vault": Policy(local_only=True)}, key=KEY)
    items = [{"k": f"m{i}", "org": org, "ts": 1.0} for i in range(3) for org in ("bank", "vault")]
    decisions, built = await run(pipeline(priv, tenant="org"), items, {"edge": rec})
    for d in decisions:
        if d.tenant == "vault":
            assert (d.tier, d.degraded, d.trace.route, d.trace.skipped) == ("reflex", True, ["reflex"], [RESIDENCY])
        else:
            assert (d.tier, d.degraded, d.trace.skipped) == ("edge", False, [])
    gate = built["edge"]
    sessions = {r.session for r in rec.requests}
    assert sessions == {gate.pseudonym(f"bank{TENANT_SEP}m{i}", "session") for i in range(3)}
    assert gate.refused == 0  # kept off the tier by the router: the door never had to refuse


async def test_local_only_keys_by_glob():
    rec = Recorder()
    items = [{"k": k, "ts": 1.0} for k in ("plant-7-a", "plant-8-a", "plant-7-b")]
    decisions, _ = await run(pipeline(Privacy(local_keys=("plant-7-*",))), items, {"edge": rec})
    assert [(d.key, d.tier, d.degraded) for d in decisions] == [
        ("plant-7-a", "reflex", True), ("plant-8-a", "edge", False), ("plant-7-b", "reflex", True)]
    assert len(rec.requests) == 1


class Paced(MemorySource):
    """One record at a time, with a pause after each: idle keys get evicted between events."""

    async def batches(self):
        async for batch in super().batches():
            yield batch
            await asyncio.sleep(0.02)


async def test_a_local_only_field_keeps_its_key_local_from_then_on():
    """bed-1 carries a patient id on its second event: that event and every later one stay local
    (the key's context holds it), across the key's state being evicted and read back."""
    rec = Recorder()
    priv = Privacy(default=Policy(fields=(FieldRule("patient_id", "drop", local_only=True),)))
    beds = [("bed-1", None), ("bed-2", None), ("bed-1", "P-881"), ("bed-2", None), ("bed-1", None),
            ("bed-2", None), ("bed-1", None)]
    items = [{"k": k, "ts": 1.0 + i, **({"patient_id": p} if p else {})} for i, (k, p) in enumerate(beds)]
    pipe = pipeline(priv)
    logic, decoder, built = pipe.build(engines={"edge": rec})
    sink = MemorySink()
    worker = Worker(logic, decoder, Paced(items, batch=1), sink, built, pipe.tiers, store=MemoryStore(),
                    max_hot_keys=1)
    await worker.run()
    assert worker.partitions.evicted >= 3  # each key left memory while the other one ran
    assert [(d.key, d.tier) for d in sink.decisions] == [
        ("bed-1", "edge"), ("bed-2", "edge"), ("bed-1", "reflex"), ("bed-2", "edge"), ("bed-1", "reflex"),
        ("bed-2", "edge"), ("bed-1", "reflex")]
    assert all(d.trace.skipped == [RESIDENCY] and d.degraded for d in sink.decisions if d.tier == "reflex")
    assert all("P-881" not in prompt(r) for r in rec.requests) and len(rec.requests) == 4


async def test_a_local_edge_takes_local_only_data_and_a_remote_cloud_does_not():
    edge, cloud = Recorder(), Recorder()
    tiers = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine=REMOTE, local=True, min_score=0.3, max_batch=1),
             TierSpec("cloud", engine=REMOTE, min_score=0.5, max_batch=1))
    priv = Privacy(tenants={"vault": Policy(local_only=True)})
    items = [{"k": "m", "org": org, "ts": 1.0} for org in ("vault", "bank")]
    decisions, built = await run(pipeline(priv, tenant="org", tiers=tiers), items, {"edge": edge, "cloud": cloud})
    assert built["edge"] is edge and isinstance(built["cloud"], Egress)
    vault, bank = decisions
    assert (vault.tier, vault.degraded, vault.trace.skipped) == ("edge", True, [f"cloud: {SKIP_RESIDENCY}"])
    assert (bank.tier, bank.degraded) == ("cloud", False)
    assert [r.local_only for r in edge.requests] == [True] and [r.local_only for r in cloud.requests] == [False]


async def test_a_trusted_local_http_tier_gets_local_only_data_over_http():
    with ScriptedOpenAIServer([chat_reply(ANSWER)], models=[{"id": "m"}]) as srv:
        tiers = (TierSpec("reflex", max_batch=1),
                 TierSpec("edge", engine=srv.url, model="m", server="openai", retries=0, local=True,
                          min_score=0.5, max_batch=1))
        priv = Privacy(tenants={"vault": Policy(local_only=True)})
        decisions, built = await run(pipeline(priv, tenant="org", tiers=tiers),
                                     [{"k": "m", "org": "vault", "ts": 1.0, "note": "LOCAL-MARK"}])
    assert isinstance(built["edge"], OpenAIEngine)  # trusted: no door in front
    assert [(d.tier, d.degraded) for d in decisions] == [("edge", False)]
    assert len(srv.calls) == 1 and "LOCAL-MARK" in srv.calls[0].raw.decode()


# -- 3. the choke point ------------------------------------------------------------------------

HTTP_CLIENTS = ("httpx", "aiohttp", "requests", "urllib.request", "urllib3", "http.client")
# modules that may speak HTTP themselves, and why none of them carries event data
HTTP_ALLOWED = {
    "ponder/inference/openai.py",  # the engine: constructed only by the registry, behind the door
    "ponder/inference/servers.py",  # asks a server what it is, with the engine's client, no data
    "ponder/demo.py",  # polls the health of a model server it started itself
    "ponder/runtime/top.py",  # reads a worker's /metrics: GETs only, sends no event data
}
ENGINE_ALLOWED = {"ponder/inference/openai.py", "ponder/inference/registry.py"}


def engine_references(source: str, filename: str) -> list[str]:
    """Where `source` names OpenAIEngine: imports, names, attributes, getattr strings."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        named = (isinstance(node, ast.Name) and node.id == "OpenAIEngine"
                 or isinstance(node, ast.Attribute) and node.attr == "OpenAIEngine"
                 or isinstance(node, ast.alias) and node.name.rsplit(".", 1)[-1] == "OpenAIEngine"
                 or isinstance(node, ast.Constant) and node.value == "OpenAIEngine")
        if named:
            found.append(f"{filename}:{getattr(node, 'lineno', '?')}")
    return found


def http_imports(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])  # not `.requests`
        found += [f"{filename}:{node.lineno} {n}" for n in names
                  if any(n == c or n.startswith(c + ".") for c in HTTP_CLIENTS)]
    return found


def test_only_the_registry_constructs_a_remote_engine():
    root = Path(ponder.__file__).resolve().parent
    engines, clients = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        source = path.read_text()
        if rel not in ENGINE_ALLOWED:
            engines += engine_references(source, rel)
        if rel not in HTTP_ALLOWED:
            clients += http_imports(source, rel)
    assert engines == [], "OpenAIEngine used outside inference/registry.py: it must sit behind the Egress"
    assert clients == [], "an HTTP client outside the engine: model traffic must pass inference/egress.py"
    registry = (root / "inference" / "registry.py").read_text()
    assert len(engine_references(registry, "registry.py")) == 2  # the import and the one call
    # the checks see through aliases and strings
    sneaky = "from ponder.inference.openai import OpenAIEngine as E\nimport ponder.inference.openai as o\n" \
             "E('http://x'); o.OpenAIEngine('http://y'); getattr(o, 'OpenAIEngine')\nimport httpx as h\n" \
             "from urllib.request import urlopen\nfrom .requests import BadRequest\n"
    assert len(engine_references(sneaky, "s.py")) == 3
    assert http_imports(sneaky, "s.py") == ["s.py:4 httpx", "s.py:5 urllib.request"]


def test_the_registry_puts_every_http_engine_behind_the_door_unless_trusted():
    for url in ("http://127.0.0.1:9/v1", "https://models.example.invalid/v1"):
        gate = build_engine(url, name="edge", privacy_key=KEY)
        assert isinstance(gate, Egress) and isinstance(gate.inner, OpenAIEngine) and gate.key == KEY
        assert gate.base_url == url  # the engine's surface reads through the door
        assert isinstance(build_engine(url, trusted_local=True), OpenAIEngine)
    assert isinstance(build_engine("reflex"), ReflexEngine)


def test_build_wraps_every_engine_of_a_remote_tier():
    given, already = Recorder(), Egress(Recorder(), KEY)
    tiers = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine=REMOTE),
             TierSpec("cloud", engine="https://models.example.invalid/v1"))
    _, _, built = pipeline(Privacy(key=KEY), tiers=tiers).build(engines={"edge": given})
    assert isinstance(built["reflex"], ReflexEngine)
    assert isinstance(built["edge"], Egress) and built["edge"].inner is given and built["edge"].key == KEY
    assert isinstance(built["cloud"], Egress) and isinstance(built["cloud"].inner, OpenAIEngine)
    _, _, built = pipeline(None, tiers=tiers).build(engines={"edge": already})
    assert built["edge"] is already  # never two doors
    assert isinstance(built["cloud"], Egress)  # no privacy policy: still behind the door
    trusted = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine=REMOTE, local=True))
    _, _, built = pipeline(None, tiers=trusted).build(engines={"edge": given})
    assert built["edge"] is given
    worker = pipeline(None, tiers=tiers).worker(MemorySource([]), MemorySink(), engines={"edge": given})
    assert all(isinstance(worker.engines[t], Egress) for t in ("edge", "cloud"))


def test_build_wraps_an_engine_instance_its_tier_marks_remote():
    remote = Recorder()
    tiers = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine=remote, local=False))
    _, _, built = pipeline(None, tiers=tiers).build()
    assert isinstance(built["edge"], Egress) and built["edge"].inner is remote


class Wire:
    """A loopback TCP relay that keeps every byte its clients send, passed on to `upstream`
    (a port) or, without one, to nobody."""

    def __init__(self, upstream: int | None = None) -> None:
        self.upstream, self.connections = upstream, 0
        self._sent = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._open = True
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Wire:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        self._thread.join()
        self._sock.close()

    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def clear(self) -> None:
        with self._lock:
            self._sent.clear()
            self.connections = 0

    def _accept(self) -> None:
        while self._open:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            with self._lock:
                self.connections += 1
            up = socket.create_connection(("127.0.0.1", self.upstream)) if self.upstream else None
            threading.Thread(target=self._pump, args=(conn, up, True), daemon=True).start()
            if up is not None:
                threading.Thread(target=self._pump, args=(up, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None, keep: bool) -> None:
        try:
            while data := src.recv(65536):
                if keep:
                    with self._lock:
                        self._sent += data
                if dst is not None:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            src.close()


def request(session: str, text: str, *, local_only: bool = False, tenant: str = "acme") -> Request:
    return Request(session, "You decide.\n", f"<data>{text}</data>\n", 64, ("none", "alert"), {},
                   request_id=f"id-{session}", tenant=tenant, local_only=local_only)


async def test_the_door_refuses_local_only_requests_without_sending_a_byte():
    with ScriptedOpenAIServer([chat_reply(ANSWER)], models=[{"id": "m"}]) as srv, Wire(srv.port) as wire:
        gate = Egress(OpenAIEngine(wire.url, "m", server="openai", retries=0, timeout_s=10.0), KEY)
        try:
            (c,) = await gate.generate([request("acme\x1fbed-1", "LOCAL-ONE", local_only=True)])
            assert (c.text, c.finish_reason, c.error) == ("", "error", REFUSED)
            assert (wire.connections, wire.sent(), srv.calls) == (0, b"", [])  # not even a connection
            mixed = await gate.generate([request("acme\x1fbed-1", "LOCAL-TWO", local_only=True),
                                         request("acme\x1fbed-2", "REMOTE-OK")])
        finally:
            await gate.stop()
    assert [c.error for c in mixed] == [REFUSED, None] and mixed[1].text == ANSWER
    assert gate.refused == 2 and len(srv.calls) == 1
    sent = wire.sent()
    assert b"REMOTE-OK" in sent and b"LOCAL" not in sent and b"bed-1" not in sent and b"bed-2" not in sent


# -- 4. pseudonyms -------------------------------------------------------------------------------


async def test_the_wire_names_keys_and_tenants_only_by_pseudonym():
    keys, tenants = ("pump-alpha-7731", "pump-bravo-2209"), ("acme-health", "globex-bank")
    items = [{"k": k, "org": t, "ts": 1.0 + i} for i in range(2) for t in tenants for k in keys]
    priv = Privacy(key=KEY)  # no rules at all: pseudonyms still
    with ScriptedOpenAIServer([chat_reply(ANSWER)], models=[{"id": "m"}]) as srv, Wire(srv.port) as wire:
        tiers = (TierSpec("reflex", max_batch=1),
                 TierSpec("edge", engine=wire.url, model="m", server="openai", retries=0, min_score=0.5,
                          max_batch=1))
        decisions, built = await run(pipeline(priv, tenant="org", tiers=tiers), items)
    assert [d.tier for d in decisions] == ["edge"] * 8 and len(srv.calls) == 8
    sent = wire.sent().decode("utf-8", "replace").lower()
    for name in (*keys, *tenants, *(d.decision_id for d in decisions)):
        assert name.lower() not in sent
    gate = built["edge"]
    shown: dict[str, set[str]] = {}  # the key a prompt names -> the `user` its bodies carry
    for c in srv.calls:
        data_key = re.search(r"<data key=\"?([^\">\s]+)", c.body["messages"][1]["content"])[1]
        shown.setdefault(data_key, set()).add(c.body["user"])
    expected = {priv.pseudonym(f"{t}{TENANT_SEP}{k}"): {gate.pseudonym(f"{t}{TENANT_SEP}{k}", "session")}
                for t in tenants for k in keys}
    assert shown == expected  # equal keys, equal pseudonyms; the same name in two tenants, two


async def test_the_door_salts_per_tenant_and_hides_tenant_ids_and_seeds():
    rec = Recorder()
    gate = Egress(rec, KEY)
    reqs = [msgspec.structs.replace(request(f"{t}\x1fk{i}", "x", tenant=t), seed=1234 + i)
            for t in ("acme", "globex") for i in range(2)]
    await gate.generate(reqs)
    salts = [r.salt for r in rec.requests]
    assert salts[0] == salts[1] != salts[2] == salts[3] and all(len(s) == 32 for s in salts)
    for sent, orig in zip(rec.requests, reqs, strict=True):
        assert orig.tenant not in (sent.tenant, sent.salt, sent.session, sent.request_id)
        assert sent.session == gate.pseudonym(orig.session, "session")
        assert sent.request_id == gate.pseudonym(orig.request_id, "request")
        assert sent.seed is not None and sent.seed != orig.seed and 0 <= sent.seed < 2**31
    seeds = [r.seed for r in rec.requests]  # each seed its own pseudonym, the same each time
    assert seeds[0] == seeds[2] != seeds[1] == seeds[3]
    # the same key, the same pseudonyms: a process restart with the same secret changes nothing
    again = Recorder()
    await Egress(again, KEY).generate(reqs)
    assert [(r.session, r.salt, r.seed) for r in again.requests] == [(r.session, r.salt, r.seed) for r in rec.requests]


# -- 5. proof by capture -------------------------------------------------------------------------


def _luhn_complete(body: str) -> str:
    return body + luhn.calc_check_digit(body)


def _iban(country_bban: tuple[str, str]) -> str:
    country, bban = country_bban
    return country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban


_US_FORMATS = ("({a}) {e}-{s}", "{a}-{e}-{s}", "+1 {a} {e} {s}", "{a}.{e}.{s}")
_FOREIGN = [phonenumbers.format_number(phonenumbers.example_number(r), phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            for r in ("GB", "DE", "FR", "JP", "BR")]
PLANTED = {
    EMAIL: st.tuples(st.from_regex(r"[a-z][a-z0-9._+]{2,12}[a-z0-9]", fullmatch=True),
                     st.from_regex(r"[a-z0-9]{3,10}", fullmatch=True), st.sampled_from(["com", "org", "io", "de"])
                     ).map(lambda t: f"{t[0]}@{t[1]}.{t[2]}"),
    PHONE: st.one_of(st.tuples(st.sampled_from(_US_FORMATS), st.sampled_from(["212", "415", "617", "206"]),
                               st.integers(200, 999), st.integers(0, 9999)).map(
        lambda t: t[0].format(a=t[1], e=t[2], s=f"{t[3]:04d}")), st.sampled_from(_FOREIGN)).filter(
        lambda p: phonenumbers.is_valid_number(phonenumbers.parse(p, "US"))),
    CARD: st.one_of(st.from_regex(r"4[0-9]{14}", fullmatch=True), st.from_regex(r"5[1-5][0-9]{13}", fullmatch=True)
                    ).map(_luhn_complete).flatmap(
        lambda n: st.sampled_from([n, *(sep.join(n[i:i + 4] for i in range(0, 16, 4)) for sep in " -")])),
    IBAN: st.one_of(st.tuples(st.just("DE"), st.from_regex(r"[0-9]{18}", fullmatch=True)),
                    st.tuples(st.just("GB"), st.from_regex(r"[A-Z]{4}[0-9]{14}", fullmatch=True))
                    ).map(_iban).filter(stdnum_iban.is_valid).flatmap(
        lambda n: st.sampled_from([n, " ".join(n[i:i + 4] for i in range(0, len(n), 4))])),
    SSN: st.tuples(st.integers(1, 899).filter(lambda a: a != 666), st.integers(1, 99), st.integers(1, 9999)).map(
        lambda t: f"{t[0]:03d}-{t[1]:02d}-{t[2]:04d}").filter(stdnum_ssn.is_valid),
    IP: st.ip_addresses().filter(lambda a: not (a.is_loopback or a.is_unspecified) and len(str(a)) >= 7).map(str),
    GPS: st.tuples(st.floats(1, 89), st.floats(1, 179), st.booleans(), st.booleans()).map(
        lambda t: f"{t[0] * (-1 if t[2] else 1):.5f}, {t[1] * (-1 if t[3] else 1):.5f}"),
    SECRET: st.one_of(st.from_regex(r"AKIA[A-Z0-9]{16}", fullmatch=True),
                      st.from_regex(r"ghp_[A-Za-z0-9]{36}", fullmatch=True),
                      st.from_regex(r"sk-[A-Za-z0-9]{24,40}", fullmatch=True),
                      st.from_regex(r"xoxb-[0-9]{10,13}-[A-Za-z0-9]{12,24}", fullmatch=True)),
}
assert set(PLANTED) == ALL
WORDS = ["contact", "reported", "owner", "note", "reach", "billing", "remark", "site"]
planted = st.sampled_from(sorted(PLANTED)).flatmap(lambda k: st.tuples(st.just(k), PLANTED[k]))
# a field: (name prefix, PII in the name or none, PII in the value, how the value is held)
fields = st.tuples(st.sampled_from(["note", "contact", "secret_ref", "acct", "msg"]), st.none() | planted, planted,
                   st.sampled_from(["text", "bare", "nested"]),
                   st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
events = st.lists(st.tuples(st.sampled_from(["acme", "acme", "vault"]), st.integers(0, 2),
                            st.lists(fields, min_size=1, max_size=4)), min_size=2, max_size=8)


def _forms(kind: str, value: str) -> tuple[list[str], list[str]]:
    """(texts that must appear nowhere, digit strings that must appear in no run of digits)."""
    texts = [value, value.lower()]
    digits: list[str] = []
    if kind == IP:
        addr = ipaddress.ip_address(value)
        texts += [addr.compressed, addr.exploded]
    elif kind == GPS:
        texts += [p.strip() for p in value.split(",")]
    elif kind == IBAN:
        texts.append(value.replace(" ", ""))
    elif kind in (CARD, SSN):
        digits.append(re.sub(r"\D", "", value))
    elif kind == PHONE:
        number = phonenumbers.parse(value, "US")
        digits += [re.sub(r"\D", "", value), str(number.national_number)]
    return texts, digits


def _unescape(text: str) -> str:
    """One level of JSON string escapes undone (bodies are JSON; prompts quote data as JSON)."""
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
    return text.replace("\\n", "\n").replace('\\"', '"').replace("\\/", "/").replace("\\\\", "\\")


def assert_nothing_planted(captured: str, planted_values: list[tuple[str, str]]) -> None:
    views = [captured]
    for _ in range(2):
        views.append(_unescape(views[-1]))
    lowered = [v.lower() for v in views]
    squeezed = [re.sub(r"\s", "", v).lower() for v in views]
    runs = [re.sub(r"\D", "", r) for v in views for r in re.findall(r"\d[\d\s().+/-]*\d", v)]
    for kind, value in planted_values:
        texts, digits = _forms(kind, value)
        for t in texts:
            t = t.lower()
            assert not any(t in v for v in lowered), f"{kind} {value!r} left the process"
            assert not any(t.replace(" ", "") in v for v in squeezed), f"{kind} {value!r} left (normalised)"
        for d in digits:
            assert not any(d in r for r in runs), f"{kind} {value!r} left as digits {d}"


def _build(spec) -> tuple[list[dict], list[tuple[str, str]]]:
    items, plants = [], []
    for i, (tenant, key, fs) in enumerate(spec):
        ev = {"k": f"meter-{key}", "org": tenant, "ts": 1000.0 + i, "level": 20.0 + i % 3}
        for j, (prefix, in_name, (kind, value), how, words) in enumerate(fs):
            name = f"{prefix}{j}" if in_name is None else f"{prefix}{j} {in_name[1]}"
            if in_name is not None:
                plants.append(in_name)
            text = " ".join([*words, value, words[0]])
            ev[name] = {"text": text, "bare": value, "nested": {"inner": [text]}}[how]
            plants.append((kind, value))
        items.append(ev)
    return items, plants


@pytest.fixture(scope="module")
def capture():
    with ScriptedOpenAIServer([chat_reply(ANSWER)], models=[{"id": "m"}]) as srv, Wire(srv.port) as wire:
        yield srv, wire


CAPTURE_PRIVACY = Privacy(
    default=Policy(pii=ALL, fields=(FieldRule("secret_ref*", "drop"), FieldRule("acct*", "hash"))),
    tenants={"vault": Policy(pii=ALL, local_only=True)}, key=KEY)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                  HealthCheck.function_scoped_fixture])
@given(spec=events)
def test_no_planted_value_leaves_the_process(capture, spec):
    srv, wire = capture
    items, plants = _build(spec)
    wire.clear()
    calls = len(srv.calls)
    tiers = (TierSpec("reflex", max_batch=1),
             TierSpec("edge", engine=wire.url, model="m", server="openai", retries=0, min_score=0.5, max_batch=4))
    decisions, built = asyncio.run(run(pipeline(CAPTURE_PRIVACY, tenant="org", tiers=tiers), items))
    # every escalation decided; the local-only tenant's at the reflex tier, flagged
    assert [d.source.offset for d in decisions] == list(range(len(items)))
    assert all(d.tier == ("reflex" if d.tenant == "vault" else "edge") for d in decisions)
    assert all(d.degraded and d.trace.skipped == [RESIDENCY] for d in decisions if d.tenant == "vault")
    # the local-only tenant sent nothing: one request per other event, none in its name
    sent = wire.sent().decode("utf-8", "replace")
    assert len(srv.calls) - calls == sum(1 for it in items if it["org"] == "acme")
    gate = built["edge"]
    for key in {it["k"] for it in items}:
        assert gate.pseudonym(f"vault{TENANT_SEP}{key}", "session") not in sent
        assert CAPTURE_PRIVACY.pseudonym(f"vault{TENANT_SEP}{key}") not in sent
    assert_nothing_planted(sent, plants)
    # nor in what is exported: decisions and their traces
    assert_nothing_planted(msgspec.json.encode([msgspec.structs.replace(d, key="") for d in decisions]).decode(),
                           plants)


def test_the_capture_check_finds_a_leak():
    """The assertion above can fail: a value sent as is, escaped, cased or reformatted is found."""
    body = json.dumps({"messages": [{"content": 'x "note"="call \\u003c(415) 555-0132 / Bob@Example.com" '
                                                "card 4111 1111 1111 1111"}]})
    for planted_value in [(PHONE, "415-555-0132"), (EMAIL, "bob@example.com"), (CARD, "4111111111111111")]:
        with pytest.raises(AssertionError):
            assert_nothing_planted(body, [planted_value])
    assert_nothing_planted(body, [(SSN, "536-90-4399"), (EMAIL, "eve@example.com")])


# -- docs/privacy.md ------------------------------------------------------------------------------


async def test_the_documented_example_does_what_the_page_says(monkeypatch):
    page = (Path(__file__).resolve().parent.parent / "docs" / "privacy.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.DOTALL)[1]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"```python\n{code}```" in readme, "the README's privacy example differs from docs/privacy.md's"
    event = json.loads(re.search(r"```json\n(\{\"monitor.*?)```", page, re.DOTALL)[1])
    trace = json.loads("{" + re.search(r"```json\n(\"privacy\".*?)```", page, re.DOTALL)[1] + "}")["privacy"]
    monkeypatch.setenv(KEY_ENV, "documented")
    ns: dict = {}
    exec(compile(code, "docs/privacy.md", "exec"), ns)  # noqa: S102 - the page's own example
    pipe = ns["pipeline"]
    edge, cloud = Recorder("page_nurse"), Recorder("page_doctor")
    items = [event, event | {"hospital": "st-marys"}, event | {"monitor": "icu-2"},
             {"monitor": "ward-9", "hospital": "general", "ts": event["ts"], "heart_rate": 140, "genome_x": "AGT"}]
    decisions, built = await run(pipe, items, {"edge": edge, "cloud": cloud})
    assert built["edge"] is edge and isinstance(built["cloud"], Egress)
    general, marys, icu, genome = decisions
    assert (general.tier, general.action, general.degraded, general.trace.privacy) == (
        "cloud", "page_doctor", False, trace)
    for local in (marys, icu, genome):  # the score asked for the cloud; the data stays on site
        assert (local.tier, local.degraded, local.trace.skipped) == ("edge", True, [f"cloud: {SKIP_RESIDENCY}"])
    (sent,) = cloud.requests
    line = next(ln for ln in sent.prefix.splitlines() if "!rule" in ln)
    shown = re.search(r"```\n<data key=.*?\n…\n(.*?)```", page, re.DOTALL)[1]
    expected = re.sub(r"\s+", " ", shown).strip()
    digest = re.search(r'"patient_id"="(h:[0-9a-f]{16})"', line)[1]
    assert line == expected.replace("h:9b1e…", digest).replace("<PHONE_1>", "\\u003cPHONE_1\\u003e")
    assert re.search(r"<data key=\"?k-[0-9a-f]{16}", sent.prefix) and "ward-3" not in prompt(sent)
