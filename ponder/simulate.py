"""Simulate a fleet of IoT devices: keyed telemetry with labelled incidents.

Everything is a pure function of the arguments, so a benchmark can be rerun and scored against
the same truth. Every device reads once inside each step's interval, so the stream is produced in
blocks of whole steps, each sorted on its own, and a million events never sit in memory at once.

With `tenants`, the devices are split into that many contiguous blocks, one per tenant (acme,
globex, ...), and every event names its device's tenant in a `tenant` field; the readings and
incidents are the same as without.

With `camera`, every event also carries a `frame`: a 64x48 greyscale PNG (a thermal camera's
view of the device) as a data URL. A device's scene is static, so its frames are byte-identical,
except during camera incidents (`hot_spot`: a hot blob appears; `object`: a dark object stands
in view), labelled in the truth on field `frame` like the other incidents; each incident shows
one frame for its whole span. Camera scenes and incidents draw from their own random stream and
keep clear of the device's telemetry incidents, so the telemetry and its incidents are exactly
those of the same fleet without a camera.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

__all__ = [
    "FIELDS",
    "KINDS",
    "CAMERA_KINDS",
    "TENANT_NAMES",
    "tenant_names",
    "Incident",
    "SimSummary",
    "Fleet",
    "iter_events",
    "incidents",
    "simulate",
]

FIELDS = ("temperature", "vibration", "pressure", "humidity")
# field -> (baseline low, baseline high, nominal noise sigma, decimals)
_SPEC = {
    "temperature": (18.0, 32.0, 0.12, 2),
    "vibration": (0.12, 0.35, 0.004, 3),
    "pressure": (100.2, 102.2, 0.04, 2),
    "humidity": (30.0, 65.0, 0.35, 1),
}
# kind -> (fewest, most) affected events
DURATIONS = {
    "spike": (1, 3),
    "drift": (100, 300),
    "stuck": (40, 200),
    "level_shift": (100, 300),
    "dropout": (30, 120),
}
KINDS = tuple(DURATIONS)
CAMERA_DURATIONS = {"hot_spot": (5, 30), "object": (5, 30)}
CAMERA_KINDS = tuple(CAMERA_DURATIONS)
FRAME_SIZE = (64, 48)  # width, height of a camera frame
_CAMERA_STREAM = 0xCA  # the camera's own random stream: SeedSequence(seed, spawn_key=(_CAMERA_STREAM,))
TENANT_NAMES = ("acme", "globex", "initech", "umbrella")  # then tenant-4, tenant-5, ...

_SECOND_INCIDENT = 0.15  # chance a device with an incident gets another one
_GAP = 50  # events kept clean between two incidents of a device, so their windows never merge
_DROPOUT_DENSITY = 0.4
_BLOCK_EVENTS = 16_384  # events generated per block: bounds memory, amortises numpy calls
_ENCODER = msgspec.json.Encoder()


class Incident(msgspec.Struct, frozen=True):
    """One labelled anomaly: `start`/`end` are the ts of its first and last affected events."""

    key: str
    kind: str
    field: str
    start: float
    end: float


class SimSummary(msgspec.Struct, frozen=True):
    """What `simulate` wrote."""

    events: int
    devices: int
    incidents: int
    by_kind: dict[str, int]
    events_path: str
    truth_path: str
    tenants: tuple[str, ...] = ()


class _Plan(msgspec.Struct):
    """An incident in step coordinates, with the parameters that draw it."""

    dev: int
    field: int
    kind: str
    first: int
    last: int
    values: Any = None  # spike deltas, or the dropout mask
    amount: float = 0.0  # drift total, shift size, or the stuck value


def _validate(devices: int, events_per_device: int, seed: int, interval_s: float,
              incident_rate: float, start_ts: float, tenants: int) -> None:
    if devices < 1:
        msg = f"devices must be >= 1, got {devices}"
        raise ValueError(msg)
    if events_per_device < 1:
        msg = f"events_per_device must be >= 1, got {events_per_device}"
        raise ValueError(msg)
    if seed < 0:
        msg = f"seed must be >= 0, got {seed}"
        raise ValueError(msg)
    # Below 10 ms a step can no longer hold every device at millisecond ts resolution.
    if not (math.isfinite(interval_s) and interval_s >= 0.01):
        msg = f"interval_s must be a finite number >= 0.01, got {interval_s}"
        raise ValueError(msg)
    if not 0.0 <= incident_rate <= 1.0:
        msg = f"incident_rate must be within [0, 1], got {incident_rate}"
        raise ValueError(msg)
    if not math.isfinite(start_ts):
        msg = f"start_ts must be finite, got {start_ts}"
        raise ValueError(msg)
    if not 0 <= tenants <= devices:
        msg = f"tenants must be within [0, devices={devices}] (each tenant owns a device), got {tenants}"
        raise ValueError(msg)


def tenant_names(n: int) -> tuple[str, ...]:
    """The first `n` tenant names."""
    return tuple(TENANT_NAMES[i] if i < len(TENANT_NAMES) else f"tenant-{i}" for i in range(n))


def _unit_hash(salt: np.uint64, devs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Map (device, step) to a uniform float in [0, 1) with splitmix64.

    A hash rather than a random stream lets the truth look up any event's ts directly.
    """
    x = (devs.astype(np.uint64) << np.uint64(32)) | steps.astype(np.uint64)
    x = x ^ salt
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Fleet:
    """Seed a fleet: per-device signal parameters, planned incidents, and the stream they make."""

    def __init__(self, devices: int, events_per_device: int, seed: int, *,
                 interval_s: float = 10.0, incident_rate: float = 0.35,
                 start_ts: float = 1_764_000_000.0, tenants: int = 0, camera: bool = False) -> None:
        _validate(devices, events_per_device, seed, interval_s, incident_rate, start_ts, tenants)
        self.devices = devices
        self.events_per_device = events_per_device
        self.seed = seed
        self.interval_s = float(interval_s)
        self.incident_rate = float(incident_rate)
        self.start_ts = float(start_ts)
        self.tenants = tenant_names(tenants)
        # contiguous blocks of devices: drawing nothing, so tenants leave the readings unchanged
        self._tenant_of = [self.tenants[i * tenants // devices] for i in range(devices)] if tenants else []
        # Separate streams, so the incident plan does not depend on how noise is blocked.
        plan_ss, self._noise_ss = np.random.SeedSequence(seed).spawn(2)
        rng = np.random.default_rng(plan_ss)
        self._salt = np.uint64(rng.integers(0, 2**63))
        width = max(5, len(str(devices - 1)))
        self.keys = [f"dev-{i:0{width}d}" for i in range(devices)]
        n_sites = min(16, devices // 20 + 1)
        self._sites = [f"plant-{s}" for s in rng.integers(1, n_sites + 1, devices).tolist()]
        # Inside each step's interval with room for +-5% jitter, so steps never interleave.
        self._offset = rng.uniform(0.1, 0.9, devices) * self.interval_s
        shape = (len(FIELDS), devices)
        lo, hi, sig, dec = (np.array([_SPEC[f][k] for f in FIELDS]) for k in range(4))
        self._base = rng.uniform(lo[:, None], hi[:, None], shape)
        self._sigma = sig[:, None] * rng.uniform(0.7, 1.3, shape)
        self._amp = self._sigma * rng.uniform(0.5, 1.5, shape)
        self._omega = 2 * np.pi / rng.uniform(200.0, 600.0, shape)
        self._phase = rng.uniform(0.0, 2 * np.pi, shape)
        self._decimals = dec.astype(int).tolist()
        self._plans = self._plan(rng)
        self.incidents = self._label(self._plans)
        self.camera = _Camera(self) if camera else None
        if self.camera is not None:
            self.incidents = sorted(self.incidents + self.camera.incidents, key=lambda inc: (inc.start, inc.key))

    @property
    def events(self) -> int:
        """Total events in the stream."""
        return self.devices * self.events_per_device

    def ts(self, devs: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Return the ts of each (device, step) pair, broadcasting the two arrays."""
        jitter = (_unit_hash(self._salt, devs, steps) - 0.5) * (0.1 * self.interval_s)
        t = self.start_ts + steps * self.interval_s + self._offset[devs] + jitter
        return np.round(t, 3)

    def _plan(self, rng: np.random.Generator) -> list[_Plan]:
        warm = min(100, self.events_per_device // 4)
        last = self.events_per_device - 2  # a device's final reading always stays clean
        room = last - warm + 1
        fitting = [k for k in KINDS if DURATIONS[k][0] <= room]
        hit = rng.random(self.devices) < self.incident_rate
        twice = (rng.random(self.devices) < _SECOND_INCIDENT).tolist()
        plans: list[_Plan] = []
        if not fitting:
            return plans
        for dev in np.flatnonzero(hit).tolist():
            mine: list[_Plan] = []
            for _ in range(1 + twice[dev]):
                kind = fitting[int(rng.integers(len(fitting)))]
                lo, hi = DURATIONS[kind]
                n = int(rng.integers(lo, min(hi, room) + 1))
                field = int(rng.integers(len(FIELDS)))
                for _attempt in range(8):
                    first = int(rng.integers(warm, last - n + 2))
                    end = first + n - 1
                    if all(end + _GAP < p.first or first > p.last + _GAP for p in mine):
                        break
                else:
                    continue  # no free room left on this device
                plan = _Plan(dev, field, kind, first, end)
                self._draw(rng, plan, n)
                mine.append(plan)
            plans.extend(mine)
        return plans

    def _draw(self, rng: np.random.Generator, p: _Plan, n: int) -> None:
        sigma = self._sigma[p.field, p.dev]
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if p.kind == "spike":
            p.values = sign * sigma * rng.uniform(8.0, 14.0, n)
        elif p.kind == "drift":
            p.amount = sign * sigma * rng.uniform(10.0, 16.0)
        elif p.kind == "level_shift":
            p.amount = sign * sigma * rng.uniform(8.0, 12.0)
        elif p.kind == "stuck":
            # Freeze at a plausible reading: the noise-free signal where it sticks.
            f, d = p.field, p.dev
            p.amount = self._base[f, d] + self._amp[f, d] * math.sin(
                self._omega[f, d] * p.first + self._phase[f, d])
        else:  # dropout
            mask = rng.random(n) < _DROPOUT_DENSITY
            mask[0] = mask[-1] = True  # the window is bounded by affected events
            p.values = mask

    def _label(self, plans: list[_Plan]) -> list[Incident]:
        if not plans:
            return []
        devs = np.array([p.dev for p in plans] * 2)
        steps = np.array([p.first for p in plans] + [p.last for p in plans])
        ts = self.ts(devs, steps).tolist()
        n = len(plans)
        out = [Incident(self.keys[p.dev], p.kind, FIELDS[p.field], ts[i], ts[n + i])
               for i, p in enumerate(plans)]
        out.sort(key=lambda inc: (inc.start, inc.key))
        return out

    def _apply(self, values: np.ndarray, j0: int, j1: int, firsts: np.ndarray,
               lasts: np.ndarray) -> None:
        for i in np.flatnonzero((firsts < j1) & (lasts >= j0)).tolist():
            p = self._plans[i]
            a, b = max(p.first, j0), min(p.last, j1 - 1)
            k = np.arange(a - p.first, b - p.first + 1)  # position inside the incident
            rows = k + (p.first - j0)
            col = values[p.field, :, p.dev]
            if p.kind == "spike":
                col[rows] += p.values[k]
            elif p.kind == "drift":
                col[rows] += p.amount * (k + 1) / (p.last - p.first + 1)
            elif p.kind == "level_shift":
                col[rows] += p.amount
            elif p.kind == "stuck":
                col[rows] = p.amount
            else:
                col[rows[p.values[k]]] = np.nan

    def iter_batches(self) -> Iterator[list[dict[str, Any]]]:
        """Yield the stream as lists of event dicts, in global (ts, device) order."""
        noise = np.random.default_rng(self._noise_ss)
        d, epd = self.devices, self.events_per_device
        per_block = max(1, min(epd, _BLOCK_EVENTS // d))
        firsts = np.array([p.first for p in self._plans], dtype=np.int64)
        lasts = np.array([p.last for p in self._plans], dtype=np.int64)
        devs = np.arange(d)
        keys, sites = self.keys, self._sites
        for j0 in range(0, epd, per_block):
            j1 = min(epd, j0 + per_block)
            steps = np.arange(j0, j1)
            ts = self.ts(devs[None, :], steps[:, None])  # (steps, devices)
            angle = self._omega[:, None, :] * steps[None, :, None] + self._phase[:, None, :]
            values = self._base[:, None, :] + self._amp[:, None, :] * np.sin(angle)
            values += self._sigma[:, None, :] * noise.standard_normal(values.shape)
            self._apply(values, j0, j1, firsts, lasts)
            for f, dec in enumerate(self._decimals):
                values[f] = np.round(values[f], dec)
            # Steps never overlap in time, so sorting within the block is a global sort.
            flat_dev = np.tile(devs, j1 - j0)
            order = np.lexsort((flat_dev, ts.ravel()))
            cols = [v.ravel()[order].tolist() for v in values]
            faulty = np.isnan(values).any(axis=0).ravel()[order]
            batch = [
                {"device_id": keys[k], "ts": t, "site": sites[k], "temperature": a,
                 "vibration": b, "pressure": c, "humidity": h, "status": "ok"}
                for k, t, a, b, c, h in zip(flat_dev[order].tolist(), ts.ravel()[order].tolist(),
                                            *cols)
            ]
            if self._tenant_of:
                owner = self._tenant_of
                for k, ev in zip(flat_dev[order].tolist(), batch):
                    ev["tenant"] = owner[k]
            if self.camera is not None:
                frame = self.camera.frame
                rows = order.tolist()
                for r, ev in zip(rows, batch):
                    ev["frame"] = frame(r % d, j0 + r // d)
            for r in np.flatnonzero(faulty).tolist():
                ev = batch[r]
                ev["status"] = "sensor_fault"
                for name in FIELDS:
                    if ev[name] != ev[name]:  # NaN marks a missing reading
                        ev[name] = None
            yield batch

    def iter_events(self) -> Iterator[dict[str, Any]]:
        """Yield event dicts one by one, in global (ts, device) order."""
        for batch in self.iter_batches():
            yield from batch

    def truth(self) -> dict[str, Any]:
        """Return the truth record: run parameters and every incident, sorted by (start, key);
        with tenants, also each tenant's devices."""
        extra = {"tenants": {t: [k for k, o in zip(self.keys, self._tenant_of) if o == t] for t in self.tenants}
                 } if self.tenants else {}
        return {
            "seed": self.seed,
            "devices": self.devices,
            "events_per_device": self.events_per_device,
            "events": self.events,
            "interval_s": self.interval_s,
            "start_ts": self.start_ts,
            "incident_rate": self.incident_rate,
            "incidents": [msgspec.structs.asdict(i) for i in self.incidents],
            **extra,
            **({"camera": True} if self.camera is not None else {}),
        }


def png_grey(pixels: np.ndarray) -> bytes:
    """A greyscale PNG of a (height, width) uint8 array: deterministic bytes, no imaging
    library needed to simulate."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class _Camera:
    """A fleet's camera: per-device scenes, camera incidents, and each event's frame."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        rng = np.random.default_rng(np.random.SeedSequence(fleet.seed, spawn_key=(_CAMERA_STREAM,)))
        d = fleet.devices
        # a scene: a level, a gradient, and up to three warm blobs (machinery), per device
        self._level = rng.uniform(40.0, 90.0, d)
        self._grad = rng.uniform(-0.4, 0.4, (d, 2))
        self._blobs = rng.uniform(0.0, 1.0, (d, 3, 4))  # x, y, radius, amplitude, each scaled below
        self._nblobs = rng.integers(1, 4, d)
        self._static: dict[int, str] = {}
        # device -> [(first step, last step, data URL)], planned clear of its telemetry incidents
        self._plans: dict[int, list[tuple[int, int, str]]] = {}
        self.incidents: list[Incident] = []
        epd = fleet.events_per_device
        warm, last = min(100, epd // 4), epd - 2
        busy: dict[int, list[tuple[int, int]]] = {}
        for p in fleet._plans:
            busy.setdefault(p.dev, []).append((p.first, p.last))
        hit = (rng.random(d) < fleet.incident_rate).tolist()
        picks = []
        for dev in range(d):
            if not hit[dev]:
                continue
            kind = CAMERA_KINDS[int(rng.integers(len(CAMERA_KINDS)))]
            lo, hi = CAMERA_DURATIONS[kind]
            n = int(rng.integers(lo, hi + 1))
            where = rng.uniform(0.0, 1.0, 4)  # position and size of what appears
            if last - n + 2 <= warm:
                continue  # a stream too short for one
            for _attempt in range(8):
                first = int(rng.integers(warm, last - n + 2))
                end = first + n - 1
                if all(end + _GAP < a or first > b + _GAP for a, b in busy.get(dev, ())):
                    break
            else:
                continue  # no free room left on this device
            picks.append((dev, kind, first, end, where))
        for dev, kind, first, end, where in picks:
            url = _data_url(self._incident(dev, kind, where))
            self._plans.setdefault(dev, []).append((first, end, url))
        if picks:
            devs = np.array([p[0] for p in picks] * 2)
            steps = np.array([p[2] for p in picks] + [p[3] for p in picks])
            ts = fleet.ts(devs, steps).tolist()
            self.incidents = [Incident(fleet.keys[dev], kind, "frame", ts[i], ts[len(picks) + i])
                              for i, (dev, kind, *_rest) in enumerate(picks)]

    def scene(self, dev: int) -> np.ndarray:
        """The device's static view, as floats (height, width)."""
        w, h = FRAME_SIZE
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = self._level[dev] + self._grad[dev, 0] * (xx - w / 2) + self._grad[dev, 1] * (yy - h / 2)
        for bx, by, br, ba in self._blobs[dev, : self._nblobs[dev]]:
            cx, cy, r, amp = bx * w, by * h, 3.0 + 6.0 * br, 20.0 + 40.0 * ba
            img += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * r * r))
        return img

    def _incident(self, dev: int, kind: str, where: np.ndarray) -> np.ndarray:
        w, h = FRAME_SIZE
        img = self.scene(dev)
        if kind == "hot_spot":  # far hotter than anything in the scene
            yy, xx = np.mgrid[0:h, 0:w]
            cx, cy, r = 8 + where[0] * (w - 16), 8 + where[1] * (h - 16), 2.0 + 2.0 * where[2]
            img = img + (120.0 + 60.0 * where[3]) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * r * r))
        else:  # a cold object standing in view
            ow, oh = 8 + int(where[2] * 8), 6 + int(where[3] * 6)
            x0, y0 = int(where[0] * (w - ow)), int(where[1] * (h - oh))
            img = img.copy()
            img[y0 : y0 + oh, x0 : x0 + ow] = 5.0
        return img

    def frame(self, dev: int, step: int) -> str:
        """The data URL of the device's frame at a step."""
        for first, last, url in self._plans.get(dev, ()):
            if first <= step <= last:
                return url
        url = self._static.get(dev)
        if url is None:
            url = self._static[dev] = _data_url(self.scene(dev))
        return url


def _data_url(img: np.ndarray) -> str:
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_grey(pixels)).decode("ascii")


def iter_events(devices: int, events_per_device: int, seed: int, **kwargs: Any
                ) -> Iterator[dict[str, Any]]:
    """Stream the simulated events without writing a file (kwargs as for `simulate`)."""
    return Fleet(devices, events_per_device, seed, **kwargs).iter_events()


def incidents(devices: int, events_per_device: int, seed: int, **kwargs: Any) -> list[Incident]:
    """Return the incidents the same arguments plant in `iter_events`'s stream."""
    return Fleet(devices, events_per_device, seed, **kwargs).incidents


def simulate(devices: int, events_per_device: int, seed: int, out_dir: Path, *,
             interval_s: float = 10.0, incident_rate: float = 0.35,
             start_ts: float = 1_764_000_000.0, tenants: int = 0, camera: bool = False) -> SimSummary:
    """Write `events.jsonl` and `truth.json` for a seeded fleet into `out_dir`."""
    fleet = Fleet(devices, events_per_device, seed, interval_s=interval_s,
                  incident_rate=incident_rate, start_ts=start_ts, tenants=tenants, camera=camera)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events_path, truth_path = out / "events.jsonl", out / "truth.json"
    with events_path.open("wb") as fh:
        for batch in fleet.iter_batches():
            fh.write(_ENCODER.encode_lines(batch))
    truth_path.write_bytes(msgspec.json.format(_ENCODER.encode(fleet.truth()), indent=2) + b"\n")
    by_kind = dict.fromkeys(KINDS + (CAMERA_KINDS if camera else ()), 0)
    for inc in fleet.incidents:
        by_kind[inc.kind] += 1
    return SimSummary(events=fleet.events, devices=devices, incidents=len(fleet.incidents),
                      by_kind=by_kind, events_path=str(events_path), truth_path=str(truth_path),
                      tenants=fleet.tenants)
