#!/usr/bin/env python3
"""Deterministic generator of NDJSON vital-sign recordings for replay tests.

Standard library only.  Every run with the same arguments writes the same bytes
(`random.Random(seed)`, no dependence on hash order or the clock).

What is written
---------------
* Valid readings.  Each of `--devices` devices (`bed-00001` ...) emits one
  reading per second of event time for `--seconds` seconds, starting at
  `--start-ms`.  A reading looks like

      {"device_id":"bed-00042","patient_id":"pat-00042","ts":1767225600123,
       "seq":0,"hr":72,"spo2":98,"temp":36.8,"sys_bp":121,"dia_bp":79,"rr":16}

  - ts = start + second*1000 + jitter (0..999 ms, drawn per reading), so a
    device never repeats a ts; seq is a per-device counter starting at 0.
  - about 10 % of devices never send patient_id.
  - some readings lack vitals (5 % temp, 3 % spo2, 2 % blood pressure,
    2 % rr, 1 % hr; at least one vital always remains).
  - about 2 % carry ts as an RFC 3339 string naming the same instant, e.g.
    "2026-01-01T00:00:01.234Z", "...T01:00:01.234+01:00", lower-case t/z,
    or 6/9 fraction digits (extra digits below the millisecond).
  - temp has one decimal, other vitals are integers, except ~2 % of spo2
    values which end in .5 (e.g. 97.5).
  - seeded anomaly episodes per device: tachycardia (hr 125-180),
    bradycardia (hr 30-39), desaturation (spo2 80-89, 10-40 s) and fever
    (temp 39.1-40.5, 30-120 s); outside episodes values stay normal
    (hr 45-110, spo2 94-100, temp 36.0-37.7), so the reference rules
    (hr > 120 or < 40; 10 s avg spo2 < 90; 60 s max temp > 39.0) match only
    inside episodes.

* Disorder.  Readings are written in order of ts + uniform[0, disorder-ms), so
  a line never appears after a line whose ts is more than `--disorder-ms`
  later than its own.

* Extra lines.  After each written reading, with probability `--bad-rate`, one
  extra line is inserted.  Categories are drawn round-robin from a shuffled
  list (reshuffled every cycle), so all categories appear once there are at
  least as many extra lines as categories (about 40).  Most are malformed or
  hostile (expected rejection reason in brackets):
    empty / whitespace-only line, truncated JSON, trailing garbage, NaN /
    Infinity literals, 1e400, invalid UTF-8, nesting depth `--deep-nesting`
    [invalid_json]; array, number, string, null, true [not_object];
    missing device_id [missing_device_id]; device_id not a string or with
    bad characters / 65 chars / leading dash [bad_device_id]; bad patient_id
    [bad_patient_id]; no ts [missing_ts]; ts float / bad string / bool /
    negative [bad_ts]; ts in year 2100 or 1 h ahead [future_ts]; seq negative
    / float / null [bad_seq]; vital string / bool / null / list
    [bad_type:<vital>]; vital out of range [out_of_range:<vital>];
    only device_id + ts [no_vitals].
  Some extra lines are valid on purpose:
    a reading with an unknown key holding a `--huge-string-kb` KB string
    (must be accepted); duplicate JSON keys (last wins: "hr":80,"hr":81 is
    valid, "hr":"x","hr":81 is valid, "hr":80,"hr":301 is out_of_range:hr);
    exact copies of a recent valid line (redelivery, counted as duplicates).
  `--too-large-lines N` additionally inserts N lines longer than 1 MiB
  [too_large] at seeded positions (default 0).

Usage:
    gen_recording.py --devices N --seconds S --seed K --out FILE
        [--disorder-ms 2000] [--bad-rate 0.001] [--start-ms 1767225600000]
        [--huge-string-kb 100] [--deep-nesting 2000] [--too-large-lines 0]
"""

from __future__ import annotations

import argparse
import collections
import heapq
import random
import sys
import time

HOUR_MS = 3_600_000


# --------------------------------------------------------------------------
# Timestamp formatting
# --------------------------------------------------------------------------


def rfc3339(ts_ms: int, rng: random.Random) -> str:
    """An RFC 3339 string for the instant ts_ms, in a randomly chosen style."""
    u = rng.random()
    if u < 0.25:
        offset_min = 120  # +02:00
    elif u < 0.35:
        offset_min = -330  # -05:30
    else:
        offset_min = 0
    local_ms = ts_ms + offset_min * 60_000
    secs, millis = divmod(local_ms, 1000)
    t = time.gmtime(secs)
    date_sep = "t" if rng.random() < 0.1 else "T"
    text = time.strftime(f"%Y-%m-%d{date_sep}%H:%M:%S", t)

    u = rng.random()
    if u < 0.15:  # extra sub-millisecond digits: floored away by the parser
        extra = rng.choice((3, 6))
        text += f".{millis:03d}" + "".join(str(rng.randrange(10)) for _ in range(extra))
    elif millis == 0 and u < 0.5:
        pass  # no fraction at all
    elif millis % 100 == 0:
        text += f".{millis // 100}"
    else:
        text += f".{millis:03d}"

    if offset_min == 0:
        text += "z" if rng.random() < 0.1 else "Z"
    else:
        sign = "+" if offset_min > 0 else "-"
        h, m = divmod(abs(offset_min), 60)
        text += f"{sign}{h:02d}:{m:02d}"
    return text


# --------------------------------------------------------------------------
# Devices and valid readings
# --------------------------------------------------------------------------


class Device:
    def __init__(self, index: int, seconds: int, rng: random.Random):
        self.device_id = f"bed-{index:05d}"
        self.patient_id = f"pat-{index:05d}" if rng.random() >= 0.10 else None
        head = f'{{"device_id":"{self.device_id}"'
        if self.patient_id is not None:
            head += f',"patient_id":"{self.patient_id}"'
        self.head = head + ',"ts":'
        self.seq = 0

        self.hr_base = rng.randint(58, 92)
        self.sys_base = rng.randint(105, 135)
        self.dia_base = rng.randint(65, 85)
        self.rr_base = rng.randint(12, 18)
        self.temp_base = rng.uniform(36.3, 37.2)

        # Anomaly episodes: second -> override kind, per vital.
        self.hr_episode: dict[int, str] = {}
        self.spo2_episode: set[int] = set()
        self.fever_episode: set[int] = set()
        for sec in self._episodes(rng, seconds, rate=1 / 800, dur=(5, 30)):
            self.hr_episode[sec] = "tachy"
        for sec in self._episodes(rng, seconds, rate=1 / 2000, dur=(5, 20)):
            self.hr_episode[sec] = "brady"
        self.spo2_episode.update(self._episodes(rng, seconds, rate=1 / 1000, dur=(10, 40)))
        self.fever_episode.update(self._episodes(rng, seconds, rate=1 / 2500, dur=(30, 120)))

    @staticmethod
    def _episodes(rng: random.Random, seconds: int, rate: float, dur: tuple) -> list[int]:
        """Seconds covered by episodes starting as a Poisson process."""
        covered = []
        t = rng.expovariate(rate)
        while t < seconds:
            start = int(t)
            length = rng.randint(*dur)
            covered.extend(range(start, min(start + length, seconds)))
            t = start + length + rng.expovariate(rate)
        return covered


def reading_line(dev: Device, sec: int, ts: int, rng: random.Random) -> str:
    """One valid reading of `dev` for second `sec` (JSON text, no newline)."""
    r = rng.random
    ts_text = f'"{rfc3339(ts, rng)}"' if r() < 0.02 else str(ts)
    parts = [dev.head, ts_text, ',"seq":', str(dev.seq)]
    dev.seq += 1

    has_hr = r() >= 0.01
    if has_hr:
        kind = dev.hr_episode.get(sec)
        if kind == "tachy":
            hr = 125 + int(r() * 56)
        elif kind == "brady":
            hr = 30 + int(r() * 10)
        else:
            hr = min(110, max(45, dev.hr_base + int(r() * 13) - 6))
        parts += (',"hr":', str(hr))

    if r() >= 0.03:
        if sec in dev.spo2_episode:
            spo2 = 80 + int(r() * 10)
        else:
            spo2 = 94 + int(r() * 7)
        if r() < 0.02:
            parts += (',"spo2":', f"{min(spo2, 99)}.5")
        else:
            parts += (',"spo2":', str(spo2))

    if r() >= 0.05:
        if sec in dev.fever_episode:
            temp = 39.1 + r() * 1.4
        else:
            temp = min(37.7, max(36.0, dev.temp_base + r() * 0.6 - 0.3))
        parts += (',"temp":', f"{temp:.1f}")

    if r() >= 0.02:
        parts += (
            ',"sys_bp":', str(dev.sys_base + int(r() * 11) - 5),
            ',"dia_bp":', str(dev.dia_base + int(r() * 9) - 4),
        )

    if r() >= 0.02 or not has_hr:  # keep at least one vital
        parts += (',"rr":', str(dev.rr_base + int(r() * 5) - 2))

    parts.append("}")
    return "".join(parts)


# --------------------------------------------------------------------------
# Extra (mostly bad) lines
# --------------------------------------------------------------------------


class BadLines:
    """Produces the extra lines; each category is a method `cat_<name>`."""

    def __init__(self, rng: random.Random, devices: list[Device], huge_kb: int, depth: int):
        self.rng = rng
        self.devices = devices
        self.huge_kb = huge_kb
        self.depth = depth
        self.recent: collections.deque = collections.deque(maxlen=2000)  # valid lines
        self.categories = sorted(n[4:] for n in dir(self) if n.startswith("cat_"))
        self.queue: list[str] = []
        self.cur_ts = 0  # max ts written so far

    # -- helpers ----------------------------------------------------------

    def _fields(self, **override) -> dict:
        """Fields (as JSON text) of a plausible reading near the current time."""
        rng = self.rng
        dev = rng.choice(self.devices)
        f = {"device_id": f'"{dev.device_id}"'}
        if dev.patient_id is not None:
            f["patient_id"] = f'"{dev.patient_id}"'
        f["ts"] = str(self.cur_ts - rng.randrange(1000))
        f["hr"] = str(rng.randint(60, 100))
        f["spo2"] = str(rng.randint(94, 100))
        f["temp"] = f"{rng.uniform(36.2, 37.4):.1f}"
        for k, v in override.items():
            if v is None:
                f.pop(k, None)
            else:
                f[k] = v
        return f

    @staticmethod
    def _obj(fields) -> str:
        items = fields.items() if isinstance(fields, dict) else fields
        return "{" + ",".join(f'"{k}":{v}' for k, v in items) + "}"

    def _valid(self) -> str:
        return self._obj(self._fields())

    def next_line(self) -> bytes:
        if not self.queue:
            self.queue = list(self.categories)
            self.rng.shuffle(self.queue)
        result = getattr(self, "cat_" + self.queue.pop())()
        return result if isinstance(result, bytes) else result.encode("utf-8")

    # -- invalid_json -----------------------------------------------------

    def cat_empty(self):
        return ""

    def cat_whitespace(self):
        return self.rng.choice((" ", "   ", "\t", " \t \r", "\r"))

    def cat_truncated(self):
        line = self._valid()
        return line[: self.rng.randrange(1, len(line) - 1)]

    def cat_trailing_garbage(self):
        return self._valid() + self.rng.choice(("x", " }", ",{}", "{}", " 1", "]", "\x00"))

    def cat_nan_infinity(self):
        vital = self.rng.choice(("hr", "spo2", "temp"))
        literal = self.rng.choice(("NaN", "Infinity", "-Infinity"))
        return self._obj(self._fields(**{vital: literal}))

    def cat_number_overflow(self):
        vital = self.rng.choice(("hr", "temp", "rr"))
        return self._obj(self._fields(**{vital: self.rng.choice(("1e400", "-1e400", "2E+999"))}))

    def cat_invalid_utf8(self):
        bad = self.rng.choice((b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"))
        where = self.rng.randrange(2)
        if where == 0:  # inside an unknown string value
            f = self._fields()
            return self._obj(f)[:-1].encode() + b',"note":"caf' + bad + b'"}'
        return b'{"device_id":"bed-' + bad + b'","ts":' + str(self.cur_ts).encode() + b',"hr":70}'

    def cat_deep_nesting(self):
        nest = "[" * self.depth + "]" * self.depth
        if self.rng.random() < 0.5:
            nest = '{"a":' * self.depth + "1" + "}" * self.depth
        f = self._fields()
        f["deep"] = nest
        return self._obj(f)

    # -- not_object -------------------------------------------------------

    def cat_array(self):
        return self.rng.choice(("[" + self._valid() + "]", "[]", "[1,2,3]"))

    def cat_bare_number(self):
        return self.rng.choice(("42", "-1.5", "0", "1767225600000"))

    def cat_string(self):
        return self.rng.choice(('"hello"', '"{\\"device_id\\":\\"bed-00001\\"}"', '""'))

    def cat_null_or_bool(self):
        return self.rng.choice(("null", " null ", "true", "false"))

    # -- device / patient ids ---------------------------------------------

    def cat_missing_device_id(self):
        return self._obj(self._fields(device_id=None))

    def cat_device_id_not_string(self):
        v = self.rng.choice(("42", "null", "true", '["bed-00001"]', '{"id":"bed-00001"}', "1.5"))
        return self._obj(self._fields(device_id=v))

    def cat_device_id_bad_chars(self):
        v = self.rng.choice(
            (
                '"../../etc/passwd"',
                '"a b"',
                '"dev*"',
                '"' + "d" * 65 + '"',
                '"-starts-with-dash"',
                '""',
                '"bed-00001\\n"',
                '"b\\u00e9d"',
                '"_leading-underscore"',
                '"bed/00001"',
            )
        )
        return self._obj(self._fields(device_id=v))

    def cat_patient_id_bad(self):
        v = self.rng.choice(('null', '42', '"pat 1"', '""', '"' + "p" * 65 + '"', '"pat;drop"', '["p"]'))
        return self._obj(self._fields(patient_id=v))

    # -- ts ---------------------------------------------------------------

    def cat_missing_ts(self):
        return self._obj(self._fields(ts=None))

    def cat_ts_float(self):
        cur = self.cur_ts
        v = self.rng.choice((f"{cur}.5", f"{cur}.0", "1.7672256e12", f"{cur}e0"))
        return self._obj(self._fields(ts=v))

    def cat_ts_bad_string(self):
        v = self.rng.choice(
            (
                '"yesterday"',
                '"2026-13-01T00:00:00Z"',
                '"2026-02-29T00:00:00Z"',
                '"2026-04-31T10:00:00Z"',
                '"2026-01-01 00:00:00Z"',
                '"2026-01-01T24:00:00Z"',
                '"2026-01-01T00:60:00Z"',
                '"2026-01-01T00:00:60Z"',
                '"2026-01-01T00:00:00"',
                '"2026-01-01T00:00:00.Z"',
                '"2026-01-01T00:00:00.1234567890Z"',
                '"2026-01-01T00:00:00+25:00"',
                '"2026-01-01T00:00:00+02"',
                '"1767225600000"',
                '""',
            )
        )
        return self._obj(self._fields(ts=v))

    def cat_ts_other_type(self):
        v = self.rng.choice(("true", "null", "-1", "[1767225600000]", "253402300800000"))
        return self._obj(self._fields(ts=v))

    def cat_ts_future(self):
        u = self.rng.random()
        if u < 0.3:
            v = "4102444800000"  # 2100-01-01T00:00:00Z
        elif u < 0.45:
            v = '"2100-06-01T12:00:00.000Z"'
        else:
            v = str(self.cur_ts + HOUR_MS + self.rng.randrange(1000))
        return self._obj(self._fields(ts=v))

    # -- seq --------------------------------------------------------------

    def cat_seq_negative(self):
        f = self._fields()
        f["seq"] = self.rng.choice(("-1", "-100"))
        return self._obj(f)

    def cat_seq_not_int(self):
        f = self._fields()
        f["seq"] = self.rng.choice(("5.0", "1.5", "null", '"7"', "18446744073709551616", "true"))
        return self._obj(f)

    # -- vitals -----------------------------------------------------------

    def cat_vital_string(self):
        vital = self.rng.choice(("hr", "spo2", "temp", "sys_bp", "dia_bp", "rr"))
        return self._obj(self._fields(**{vital: self.rng.choice(('"80"', '"high"', '""'))}))

    def cat_vital_bool(self):
        vital = self.rng.choice(("hr", "spo2", "temp", "rr"))
        return self._obj(self._fields(**{vital: self.rng.choice(("true", "false"))}))

    def cat_vital_null(self):
        vital = self.rng.choice(("hr", "spo2", "temp", "dia_bp"))
        return self._obj(self._fields(**{vital: "null"}))

    def cat_vital_container(self):
        vital = self.rng.choice(("hr", "spo2", "temp"))
        return self._obj(self._fields(**{vital: self.rng.choice(("[80]", '{"v":80}'))}))

    def cat_vital_out_of_range(self):
        vital, value = self.rng.choice(
            (
                ("hr", "301"),
                ("hr", "-1"),
                ("spo2", "-1"),
                ("spo2", "100.1"),
                ("temp", "24.9"),
                ("temp", "45.1"),
                ("rr", "101"),
                ("sys_bp", "300.5"),
                ("dia_bp", "-0.1"),
            )
        )
        return self._obj(self._fields(**{vital: value}))

    def cat_no_vitals(self):
        return self._obj(self._fields(hr=None, spo2=None, temp=None))

    # -- valid on purpose -------------------------------------------------

    def cat_huge_unknown_string(self):
        f = self._fields()
        f["blob"] = '"' + "x" * (self.huge_kb * 1024) + '"'
        return self._obj(f)

    def cat_redelivery(self):
        if not self.recent:
            return self._valid()
        return self.rng.choice(self.recent)

    def cat_duplicate_keys(self):
        f = self._fields(hr=None)
        first, last = self.rng.choice((("80", "81"), ('"x"', "81"), ("80", "301"), ("null", "70")))
        items = [("device_id", f.pop("device_id")), ("hr", first), ("hr", last)]
        items += list(f.items())
        return self._obj(items)


def too_large_line(rng: random.Random, cur_ts: int) -> bytes:
    pad = "y" * (1024 * 1024 + rng.randrange(1, 4096))
    return f'{{"device_id":"bed-00001","ts":{cur_ts},"hr":70,"pad":"{pad}"}}'.encode()


# --------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    devices = [Device(i, args.seconds, rng) for i in range(1, args.devices + 1)]
    bad = BadLines(rng, devices, args.huge_string_kb, args.deep_nesting)
    bad.cur_ts = args.start_ms
    total_readings = args.devices * args.seconds
    too_large_at = set(rng.sample(range(total_readings), min(args.too_large_lines, total_readings)))

    stats = {"readings": 0, "extra": 0, "too_large": 0}
    out_chunks: list[bytes] = []
    pending: list[tuple] = []  # heap of (order key, counter, ts, line)
    counter = 0
    r = rng.random
    disorder = args.disorder_ms
    bad_rate = args.bad_rate

    with open(args.out, "wb") as out:

        def emit(ts: int, line: str) -> None:
            data = line.encode()
            out_chunks.append(data)
            bad.recent.append(data)
            if ts > bad.cur_ts:
                bad.cur_ts = ts
            n = stats["readings"]
            stats["readings"] = n + 1
            if n in too_large_at:
                out_chunks.append(too_large_line(rng, bad.cur_ts))
                stats["too_large"] += 1
            if r() < bad_rate:
                out_chunks.append(bad.next_line())
                stats["extra"] += 1
            if len(out_chunks) >= 50_000:
                flush()

        def flush() -> None:
            if out_chunks:
                out.write(b"\n".join(out_chunks) + b"\n")
                out_chunks.clear()

        for sec in range(args.seconds):
            base = args.start_ms + sec * 1000
            for dev in devices:
                ts = base + int(r() * 1000)
                line = reading_line(dev, sec, ts, rng)
                heapq.heappush(pending, (ts + r() * disorder, counter, ts, line))
                counter += 1
            # Every later reading has ts >= base + 1000, hence key >= base + 1000.
            horizon = base + 1000
            while pending and pending[0][0] < horizon:
                _, _, ts, line = heapq.heappop(pending)
                emit(ts, line)
        while pending:
            _, _, ts, line = heapq.heappop(pending)
            emit(ts, line)
        flush()
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--disorder-ms", type=int, default=2000)
    p.add_argument("--bad-rate", type=float, default=0.001)
    p.add_argument("--start-ms", type=int, default=1767225600000)  # 2026-01-01T00:00:00Z
    p.add_argument("--huge-string-kb", type=int, default=100)
    p.add_argument("--deep-nesting", type=int, default=2000)
    p.add_argument("--too-large-lines", type=int, default=0)
    args = p.parse_args(argv)
    if args.devices < 1 or args.seconds < 1 or args.disorder_ms < 0:
        p.error("--devices and --seconds must be >= 1, --disorder-ms >= 0")
    stats = generate(args)
    print(
        f"wrote {args.out}: {stats['readings']} readings + {stats['extra']} extra lines"
        f" + {stats['too_large']} too-large lines",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
