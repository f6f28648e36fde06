"""The simulator: deterministic, ordered, exact in size, and every labelled incident visible."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import pytest

from ponder.simulate import DURATIONS, FIELDS, KINDS, Fleet, incidents, iter_events, simulate, tenant_names

DEVICES, EPD, SEED = 40, 600, 11
WARM = min(100, EPD // 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate(DEVICES, EPD, SEED, out, incident_rate=1.0)
    raw = Path(summary.events_path).read_bytes()
    events = [msgspec.json.decode(line) for line in raw.splitlines()]
    truth = msgspec.json.decode(Path(summary.truth_path).read_bytes())
    per_dev: dict[str, list[dict]] = defaultdict(list)
    for ev in events:
        per_dev[ev["device_id"]].append(ev)
    return summary, raw, events, truth, per_dev


def _window(per_dev, inc):
    """Return the device's events and the index range [a, b] the incident covers."""
    evs = per_dev[inc["key"]]
    ts = [e["ts"] for e in evs]
    return evs, ts.index(inc["start"]), ts.index(inc["end"])


def _sigma(evs, field):
    """Estimate the field's noise from the warm-up, which never holds an incident."""
    xs = [e[field] for e in evs[:WARM]]
    return statistics.stdev(b - a for a, b in zip(xs, xs[1:])) / 2**0.5


def test_same_seed_same_bytes_other_seed_differs(tmp_path, run):
    summary, raw, *_ = run
    again = simulate(DEVICES, EPD, SEED, tmp_path / "a", incident_rate=1.0)
    assert Path(again.events_path).read_bytes() == raw
    assert Path(again.truth_path).read_bytes() == Path(summary.truth_path).read_bytes()
    other = simulate(DEVICES, EPD, SEED + 1, tmp_path / "b", incident_rate=1.0)
    assert Path(other.events_path).read_bytes() != raw
    assert Path(other.truth_path).read_bytes() != Path(summary.truth_path).read_bytes()


def test_stream_matches_file_and_incident_list(run):
    summary, raw, _, truth, _ = run
    enc = msgspec.json.Encoder()
    streamed = enc.encode_lines(list(iter_events(DEVICES, EPD, SEED, incident_rate=1.0)))
    assert streamed == raw
    listed = [msgspec.structs.asdict(i) for i in incidents(DEVICES, EPD, SEED, incident_rate=1.0)]
    assert listed == truth["incidents"]


def test_counts_and_summary(run):
    summary, _, events, truth, per_dev = run
    assert len(events) == DEVICES * EPD == summary.events == truth["events"]
    assert summary.devices == DEVICES == truth["devices"]
    assert truth["events_per_device"] == EPD and truth["seed"] == SEED
    assert truth["interval_s"] == 10.0
    assert len(per_dev) == DEVICES
    assert all(len(evs) == EPD for evs in per_dev.values())
    assert summary.incidents == len(truth["incidents"])
    counts = Counter(i["kind"] for i in truth["incidents"])
    assert summary.by_kind == {k: counts.get(k, 0) for k in KINDS}
    # rate 1.0: every device gets at least one incident, some get two
    assert DEVICES <= summary.incidents <= 2 * DEVICES
    assert all(summary.by_kind[k] > 0 for k in KINDS)


def test_event_shape(run):
    _, _, events, _, _ = run
    ev = events[0]
    assert list(ev) == ["device_id", "ts", "site", *FIELDS, "status"]
    assert ev["device_id"].startswith("dev-") and len(ev["device_id"]) == 9
    assert ev["site"].startswith("plant-")
    assert {e["status"] for e in events} == {"ok", "sensor_fault"}
    # a device stays at one site
    sites = defaultdict(set)
    for e in events:
        sites[e["device_id"]].add(e["site"])
    assert all(len(s) == 1 for s in sites.values())


def test_global_and_per_device_order(run):
    _, _, events, _, per_dev = run
    pairs = [(e["ts"], e["device_id"]) for e in events]
    assert pairs == sorted(pairs)
    for evs in per_dev.values():
        ts = [e["ts"] for e in evs]
        assert all(b > a for a, b in zip(ts, ts[1:]))
    # devices interleave: the first step holds one reading of every device
    assert {e["device_id"] for e in events[:DEVICES]} == set(per_dev)


def test_incident_placement(run):
    _, _, _, truth, per_dev = run
    incs = truth["incidents"]
    assert incs == sorted(incs, key=lambda i: (i["start"], i["key"]))
    spans = defaultdict(list)
    for inc in incs:
        assert inc["kind"] in KINDS and inc["field"] in FIELDS
        evs, a, b = _window(per_dev, inc)
        lo, hi = DURATIONS[inc["kind"]]
        assert lo <= b - a + 1 <= hi
        assert a >= WARM and b < EPD - 1
        spans[inc["key"]].append((a, b))
    for s in spans.values():
        s.sort()
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(s, s[1:]))


def test_every_incident_is_visible(run):
    _, _, _, truth, per_dev = run
    for inc in truth["incidents"]:
        evs, a, b = _window(per_dev, inc)
        f = inc["field"]
        xs = [e[f] for e in evs]
        sig = _sigma(evs, f)
        kind = inc["kind"]
        if kind == "spike":
            ref = statistics.median(xs[a - 10:a] + xs[b + 1:b + 11])
            assert all(abs(x - ref) > 4 * sig for x in xs[a:b + 1]), inc
        elif kind == "drift":
            before = statistics.fmean(xs[a - 10:a])
            early = abs(statistics.fmean(xs[a:a + 10]) - before)
            late = abs(statistics.fmean(xs[b - 9:b + 1]) - before)
            assert late > 4 * sig and late > early + 3 * sig, inc
        elif kind == "level_shift":
            outside = xs[a - 50:a] + xs[b + 1:b + 51]
            gap = abs(statistics.fmean(xs[a:b + 1]) - statistics.fmean(outside))
            assert gap > 4 * sig, inc
        elif kind == "stuck":
            assert len(set(xs[a:b + 1])) == 1, inc
            # normally the field never holds a value for even a quarter of the shortest window
            assert all(len(set(xs[i:i + 10])) > 1 for i in range(WARM - 10)), inc
        else:
            window = evs[a:b + 1]
            assert window[0][f] is None and window[-1][f] is None
            assert all((e[f] is None) == (e["status"] == "sensor_fault") for e in window)


def test_nulls_and_faults_only_inside_dropouts(run):
    _, _, events, truth, per_dev = run
    allowed = set()
    for inc in truth["incidents"]:
        if inc["kind"] == "dropout":
            evs, a, b = _window(per_dev, inc)
            allowed.update((e["device_id"], e["ts"], inc["field"]) for e in evs[a:b + 1])
    faults = 0
    for e in events:
        missing = [f for f in FIELDS if e[f] is None]
        assert all((e["device_id"], e["ts"], f) in allowed for f in missing)
        assert (e["status"] == "sensor_fault") == bool(missing)
        faults += bool(missing)
    assert 0.3 < faults / len(allowed) < 0.55  # intermittent, ~40% of the window


def test_rate_zero_and_tiny_streams():
    assert incidents(5, 500, 1, incident_rate=0.0) == []
    evs = list(iter_events(3, 1, 0, incident_rate=1.0))
    assert len(evs) == 3 and incidents(3, 1, 0, incident_rate=1.0) == []
    # too short for the long kinds: only what fits is planted
    short = incidents(30, 12, 2, incident_rate=1.0)
    assert short and {i.kind for i in short} == {"spike"}
    assert len(list(iter_events(30, 12, 2))) == 360


def test_key_width_grows_with_fleet():
    keys = Fleet(100_001, 1, 0, incident_rate=0.0).keys
    assert keys[0] == "dev-000000" and keys[-1] == "dev-100000"


def test_blocks_span_many_steps_and_many_devices():
    # One device (blocks of many steps) and many devices (a block per step) both stay ordered.
    for devices, epd in ((1, 40_000), (20_000, 2)):
        evs = list(iter_events(devices, epd, 5))
        assert len(evs) == devices * epd
        pairs = [(e["ts"], e["device_id"]) for e in evs]
        assert pairs == sorted(pairs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"devices": 0}, "devices must be >= 1"),
        ({"events_per_device": 0}, "events_per_device must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"interval_s": 0.0}, "interval_s must be"),
        ({"interval_s": float("nan")}, "interval_s must be"),
        ({"incident_rate": 1.5}, "incident_rate must be within"),
        ({"start_ts": float("inf")}, "start_ts must be finite"),
        ({"tenants": -1}, r"tenants must be within \[0, devices=2\]"),
        ({"tenants": 3}, r"tenants must be within \[0, devices=2\] \(each tenant owns a device\), got 3"),
    ],
)
def test_bad_args(tmp_path, kwargs, match):
    args = {"devices": 2, "events_per_device": 10, "seed": 0, "out_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=match):
        simulate(**args)
    assert not (tmp_path / "events.jsonl").exists()


def test_tenants_split_the_devices_and_change_nothing_else(run):
    _, _, events, truth, _ = run
    assert "tenants" not in truth and all("tenant" not in e for e in events)  # the default: none
    fleet = Fleet(DEVICES, EPD, SEED, incident_rate=1.0, tenants=3)
    with_tenants = list(fleet.iter_events())
    assert [{k: v for k, v in e.items() if k != "tenant"} for e in with_tenants] == events
    assert list(with_tenants[0]) == ["device_id", "ts", "site", *FIELDS, "status", "tenant"]
    owner = {}
    for e in with_tenants:
        assert owner.setdefault(e["device_id"], e["tenant"]) == e["tenant"]  # a device keeps its tenant
    keys = fleet.keys
    # contiguous blocks of 40 // 3 or one more devices, in name order
    expected = {"acme": keys[:14], "globex": keys[14:27], "initech": keys[27:]}
    assert fleet.truth()["tenants"] == expected
    assert {t: sorted(k for k, o in owner.items() if o == t) for t in expected} == expected
    assert fleet.truth()["incidents"] == truth["incidents"]


def test_tenant_names_and_the_summary(tmp_path):
    assert tenant_names(0) == ()
    assert tenant_names(6) == ("acme", "globex", "initech", "umbrella", "tenant-4", "tenant-5")
    s = simulate(4, 10, 0, tmp_path, tenants=4)
    assert s.tenants == ("acme", "globex", "initech", "umbrella")
    lines = [msgspec.json.decode(x) for x in Path(s.events_path).read_bytes().splitlines()]
    assert {(e["device_id"], e["tenant"]) for e in lines} == {
        ("dev-00000", "acme"), ("dev-00001", "globex"), ("dev-00002", "initech"), ("dev-00003", "umbrella")}
    assert simulate(4, 10, 0, tmp_path / "none").tenants == ()


def test_cli_simulate_with_tenants(tmp_path):
    from typer.testing import CliRunner

    from ponder.cli import app

    r = CliRunner().invoke(app, ["simulate", "--devices", "6", "--events-per-device", "20", "--tenants", "2",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "(tenants: acme, globex)" in " ".join(r.output.split())  # rich wraps long lines
    events = [msgspec.json.decode(x) for x in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert len(events) == 120
    assert sorted(Counter(e["tenant"] for e in events).items()) == [("acme", 60), ("globex", 60)]
    r = CliRunner().invoke(app, ["simulate", "--devices", "2", "--tenants", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "tenants must be within [0, devices=2]" in " ".join(r.output.split())


# -- cameras (Fleet(camera=True)) ----------------------------------------------------------------


def test_camera_is_deterministic_and_leaves_the_telemetry_as_it_was():
    a, b = Fleet(12, 300, 4, camera=True), Fleet(12, 300, 4, camera=True)
    events = list(a.iter_events())
    assert events == list(b.iter_events()) and a.truth() == b.truth()
    assert [e["frame"] for e in Fleet(12, 300, 5, camera=True).iter_events()] != [e["frame"] for e in events]
    plain = Fleet(12, 300, 4)
    assert [{k: v for k, v in e.items() if k != "frame"} for e in events] == list(plain.iter_events())
    assert [i for i in a.incidents if i.field != "frame"] == plain.incidents
    assert a.truth() == {**plain.truth(), "incidents": a.truth()["incidents"], "camera": True}


def test_changed_frames_are_exactly_the_labelled_camera_incidents():
    from ponder.images import parse_image

    fleet = Fleet(30, 400, 8, camera=True, incident_rate=0.5)
    cams = [i for i in fleet.incidents if i.field == "frame"]
    assert cams and {i.kind for i in cams} == {"hot_spot", "object"}
    frames: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for ev in fleet.iter_events():
        frames[ev["device_id"]].append((ev["ts"], ev["frame"]))
    changed, distinct = set(), Counter()
    for key, seq in frames.items():
        static = seq[0][1]  # a device's first reading always shows its scene (incidents start after warm-up)
        odd = {f for _, f in seq if f != static}
        changed |= {(key, ts) for ts, f in seq if f != static}
        distinct[key] = len(odd)
    labelled = {(i.key, ts) for i in cams for ts, _ in frames[i.key] if i.start <= ts <= i.end}
    assert changed == labelled
    assert len(changed) == sum(sum(i.start <= ts <= i.end for ts, _ in frames[i.key]) for i in cams)
    assert distinct == Counter(i.key for i in cams)  # one frame per incident, all its span
    for i in cams:  # clear of the device's telemetry incidents
        assert all(o.end < i.start or o.start > i.end for o in fleet.incidents if o.key == i.key and o is not i)
    img = parse_image(frames[cams[0].key][0][1], field="frame", allowed_dirs=(), max_bytes=10_000)
    assert (img.mime, img.width, img.height) == ("image/png", 64, 48)


def test_simulate_with_camera_counts_its_kinds(tmp_path):
    summary = simulate(10, 300, 2, tmp_path, incident_rate=1.0, camera=True)
    truth = msgspec.json.decode(Path(summary.truth_path).read_bytes())
    counts = Counter(i["kind"] for i in truth["incidents"])
    assert summary.by_kind == {k: counts.get(k, 0) for k in (*KINDS, "hot_spot", "object")}
    assert counts["hot_spot"] + counts["object"] > 0 and truth["camera"] is True
    first = msgspec.json.decode(Path(summary.events_path).read_bytes().splitlines()[0])
    assert first["frame"].startswith("data:image/png;base64,iVBORw0KGgo")
