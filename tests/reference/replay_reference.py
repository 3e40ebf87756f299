#!/usr/bin/env python3
"""Independent reference implementation of `vitalstream replay` (for differential tests).

Standard library only; written for clarity, not speed.  It reads an NDJSON
recording and prints one JSON object with the counters the Rust command must
reproduce exactly:

    {"lines", "accepted", "rejected", "rejected_by_reason": {reason: n},
     "late", "duplicates",
     "rules": {"r1_hr_abnormal": {"matches"}, "r2_spo2_low_10s": {"matches"},
               "r3_fever_60s": {"matches"}}}

Semantics (the contract; do not "improve" it)
---------------------------------------------
Lines.  The file is read as bytes and split on b"\\n".  If the file ends with
"\\n" the empty piece after it is not a line; every other piece (including
empty and whitespace-only pieces) is a line.  A "\\r" before the "\\n" stays in
the line (it is JSON whitespace, so it is harmless).

Validation of one line; the first failing check gives the rejection reason:
  1. more than 1 MiB (1,048,576 bytes)                        -> too_large
  2. not UTF-8, or not RFC 8259 JSON (no NaN/Infinity literals,
     no number overflowing a double such as 1e400, nothing but
     whitespace, nesting deeper than 128 levels anywhere)      -> invalid_json
     Whitespace around the value is allowed; duplicate keys: the last wins.
  3. top-level value is not an object                         -> not_object
  4. no "device_id"                                           -> missing_device_id
     not a string matching ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$  -> bad_device_id
  5. "patient_id" present (even null) and not such a string   -> bad_patient_id
  6. no "ts"                                                  -> missing_ts
     "ts" must be a JSON integer (not bool; 1.0 and 1e3 are floats) in
     0..=253402300799999 (epoch ms), or an RFC 3339 string
     YYYY-MM-DD[Tt]hh:mm:ss[.f{1,9}]([Zz]|[+-]hh:mm) naming a real instant
     (fraction floored to ms, offset subtracted) in that same range,
     otherwise                                                 -> bad_ts
  7. "seq" present and not an integer in 0..=2**64-1 (null too) -> bad_seq
  8. for each vital present, in the order hr, spo2, temp, sys_bp, dia_bp, rr:
     not an int/float (bool, null, string, list, object)        -> bad_type:<name>
     outside the inclusive range (hr 0-300, spo2 0-100, temp 25-45,
     sys_bp 0-300, dia_bp 0-300, rr 0-100)                      -> out_of_range:<name>
  9. no vital present at all                                   -> no_vitals
  Unknown keys are ignored whatever their type (subject to the depth limit).

Then, for valid lines in file order (one source, one clock):
 10. future_ts: rejected if ts > now_ms + skew_ms, or if something has already
     been accepted and ts > max_accepted_ts + skew_ms.  Rejected readings
     change no state.  Otherwise the reading is accepted.
 11. Watermark W = (max ts of readings accepted before this one) - lateness_ms;
     there is no watermark before the first accepted reading.  The reading is
     late if W exists and ts < W.  Then max ts is updated.
 12. Duplicate: an earlier accepted non-duplicate reading of the same device_id
     had the same ts, or (both having a seq) the same seq.  Duplicates count in
     "duplicates" only (never in "late") and are not evaluated.  Otherwise a
     late reading counts in "late" and is not evaluated.  Late non-duplicates
     are still remembered for later duplicate checks.
 13. Non-late, non-duplicate readings are evaluated:
     r1_hr_abnormal   one match per reading with hr > 120 or hr < 40.
     r2_spo2_low_10s  tumbling 10 s windows per device_id, start =
                      floor(ts / 10000) * 10000; one match per (device, window)
                      holding >= 1 spo2 value with avg(spo2) < 90.
     r3_fever_60s     sliding 60 s windows every 10 s per device_id: a reading
                      belongs to the 6 windows with start s (a multiple of
                      10000) and s <= ts < s + 60000; one match per (device,
                      window) holding >= 1 temp value with max(temp) > 39.0.
     Windows are evaluated once, at the end of the input.

Usage:
    replay_reference.py --input FILE [--lateness-ms 5000] [--skew-ms 300000]
                        [--now-ms MS]      (default: wall clock)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

MAX_LINE_BYTES = 1024 * 1024
MAX_DEPTH = 128
MAX_TS_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
MAX_SEQ = 2**64 - 1

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", re.ASCII)
RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)

# Vital name -> inclusive (low, high); dict order is the validation order.
VITAL_RANGES = {
    "hr": (0, 300),
    "spo2": (0, 100),
    "temp": (25, 45),
    "sys_bp": (0, 300),
    "dia_bp": (0, 300),
    "rr": (0, 100),
}

R2_WINDOW_MS = 10_000
R3_WINDOW_MS = 60_000
R3_SLIDE_MS = 10_000

# Python (3.11+) refuses to convert int literals longer than 4300 digits; a
# huge JSON integer is still valid JSON, so lift that limit.
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)


# --------------------------------------------------------------------------
# Step 1-9: validation of one line
# --------------------------------------------------------------------------


class InvalidJson(Exception):
    pass


def _reject_constant(name: str) -> Any:
    # Called by json for NaN, Infinity and -Infinity, which RFC 8259 forbids.
    raise InvalidJson(f"non-standard literal {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # e.g. 1e400: not representable as a double
        raise InvalidJson(f"number overflows: {text}")
    return value


_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET_RE = re.compile(rb"[^\[\]{}]")


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """True if arrays/objects in the (already validated) JSON text nest more
    than `limit` levels; the top-level container is level 1.

    This looks at the text, not at the parsed value, so a deep value that a
    later duplicate key overwrites still counts (a streaming parser such as
    serde_json sees it too)."""
    brackets = _NOT_BRACKET_RE.sub(b"", _JSON_STRING_RE.sub(b"", raw))
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_json_line(raw: bytes) -> Any:
    """Parse one line as strict RFC 8259 JSON; raise InvalidJson otherwise."""
    try:
        text = raw.decode("utf-8")  # strict: rejects overlong forms, surrogates
        value = json.loads(
            text, parse_constant=_reject_constant, parse_float=_parse_float
        )
    except (ValueError, RecursionError, InvalidJson) as exc:
        # ValueError covers UnicodeDecodeError and json.JSONDecodeError
        # (including an empty / whitespace-only line).
        raise InvalidJson(str(exc)) from None
    # Cheap bound first: the depth cannot exceed the number of brackets.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_exceeds(raw, MAX_DEPTH):
        raise InvalidJson("nesting too deep")
    return value


def is_json_int(value: Any) -> bool:
    return type(value) is int  # excludes bool (a subclass of int) and float


def is_json_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def is_valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if _is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_rfc3339_ms(text: str) -> Optional[int]:
    """Epoch milliseconds of an RFC 3339 timestamp, or None if invalid."""
    m = RFC3339_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    frac, zulu, sign, off_h, off_m = m.group(7, 8, 9, 10, 11)
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    if hour >= 24 or minute >= 60 or second >= 60:
        return None
    offset_min = 0
    if not zulu:
        off_h, off_m = int(off_h), int(off_m)
        if off_h >= 24 or off_m >= 60:
            return None
        offset_min = off_h * 60 + off_m
        if sign == "-":
            offset_min = -offset_min
    millis = int((frac or "").ljust(3, "0")[:3])  # floor to milliseconds
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return (seconds - offset_min * 60) * 1000 + millis


def parse_ts(value: Any) -> Optional[int]:
    """Epoch ms of a `ts` value, or None if it is not acceptable."""
    if is_json_int(value):
        ms = value
    elif isinstance(value, str):
        ms = parse_rfc3339_ms(value)
        if ms is None:
            return None
    else:
        return None
    return ms if 0 <= ms <= MAX_TS_MS else None


@dataclass
class Reading:
    device_id: str
    ts: int
    seq: Optional[int]
    vitals: dict  # name -> int | float, only the vitals present


def validate_line(raw: bytes) -> tuple[Optional[str], Optional[Reading]]:
    """Return (reason, None) for a rejected line or (None, reading)."""
    if len(raw) > MAX_LINE_BYTES:
        return "too_large", None
    try:
        obj = parse_json_line(raw)
    except InvalidJson:
        return "invalid_json", None
    if not isinstance(obj, dict):
        return "not_object", None

    if "device_id" not in obj:
        return "missing_device_id", None
    device_id = obj["device_id"]
    if not is_valid_id(device_id):
        return "bad_device_id", None

    if "patient_id" in obj and not is_valid_id(obj["patient_id"]):
        return "bad_patient_id", None

    if "ts" not in obj:
        return "missing_ts", None
    ts = parse_ts(obj["ts"])
    if ts is None:
        return "bad_ts", None

    seq = None
    if "seq" in obj:
        seq = obj["seq"]
        if not (is_json_int(seq) and 0 <= seq <= MAX_SEQ):
            return "bad_seq", None

    vitals = {}
    for name, (low, high) in VITAL_RANGES.items():
        if name not in obj:
            continue
        value = obj[name]
        if not is_json_number(value):
            return f"bad_type:{name}", None
        if not low <= value <= high:
            return f"out_of_range:{name}", None
        vitals[name] = value
    if not vitals:
        return "no_vitals", None

    return None, Reading(device_id, ts, seq, vitals)


# --------------------------------------------------------------------------
# Steps 10-13: ordering, lateness, duplicates and rules
# --------------------------------------------------------------------------


def r3_window_starts(ts: int) -> list[int]:
    """Starts s (multiples of 10 s) of the sliding windows with s <= ts < s+60 s."""
    last = (ts // R3_SLIDE_MS) * R3_SLIDE_MS
    count = R3_WINDOW_MS // R3_SLIDE_MS
    return [last - i * R3_SLIDE_MS for i in range(count - 1, -1, -1)]


class Replay:
    def __init__(self, now_ms: int, lateness_ms: int = 5000, skew_ms: int = 300_000):
        self.now_ms = now_ms
        self.lateness_ms = lateness_ms
        self.skew_ms = skew_ms

        self.lines = 0
        self.accepted = 0
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self.late = 0
        self.duplicates = 0

        self.max_ts: Optional[int] = None  # over accepted readings
        self.seen_ts: dict[str, set] = {}  # device -> ts of non-duplicates
        self.seen_seq: dict[str, set] = {}  # device -> seq of non-duplicates

        self.r1_matches = 0
        self.r2_windows: dict[tuple, list] = {}  # (device, start) -> [sum, count]
        self.r3_windows: dict[tuple, float] = {}  # (device, start) -> max temp

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def feed_line(self, raw: bytes) -> None:
        self.lines += 1
        reason, reading = validate_line(raw)
        if reason is not None:
            self._reject(reason)
            return
        self.feed_reading(reading)

    def feed_reading(self, r: Reading) -> None:
        # 10. future timestamps
        if r.ts > self.now_ms + self.skew_ms or (
            self.max_ts is not None and r.ts > self.max_ts + self.skew_ms
        ):
            self._reject("future_ts")
            return
        self.accepted += 1

        # 11. watermark from readings accepted before this one
        late = self.max_ts is not None and r.ts < self.max_ts - self.lateness_ms
        if self.max_ts is None or r.ts > self.max_ts:
            self.max_ts = r.ts

        # 12. duplicates (take precedence over lateness)
        ts_set = self.seen_ts.setdefault(r.device_id, set())
        seq_set = self.seen_seq.setdefault(r.device_id, set())
        if r.ts in ts_set or (r.seq is not None and r.seq in seq_set):
            self.duplicates += 1
            return
        ts_set.add(r.ts)
        if r.seq is not None:
            seq_set.add(r.seq)
        if late:
            self.late += 1
            return

        # 13. rule evaluation
        self._evaluate(r)

    def _evaluate(self, r: Reading) -> None:
        hr = r.vitals.get("hr")
        if hr is not None and (hr > 120 or hr < 40):
            self.r1_matches += 1

        spo2 = r.vitals.get("spo2")
        if spo2 is not None:
            key = (r.device_id, (r.ts // R2_WINDOW_MS) * R2_WINDOW_MS)
            acc = self.r2_windows.get(key)
            if acc is None:
                self.r2_windows[key] = [spo2, 1]
            else:
                acc[0] += spo2
                acc[1] += 1

        temp = r.vitals.get("temp")
        if temp is not None:
            for start in r3_window_starts(r.ts):
                key = (r.device_id, start)
                best = self.r3_windows.get(key)
                if best is None or temp > best:
                    self.r3_windows[key] = temp

    def result(self) -> dict:
        r2 = sum(1 for total, n in self.r2_windows.values() if total / n < 90)
        r3 = sum(1 for best in self.r3_windows.values() if best > 39.0)
        return {
            "lines": self.lines,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "late": self.late,
            "duplicates": self.duplicates,
            "rules": {
                "r1_hr_abnormal": {"matches": self.r1_matches},
                "r2_spo2_low_10s": {"matches": r2},
                "r3_fever_60s": {"matches": r3},
            },
        }


def iter_lines(stream) -> Any:
    """Yield the lines of a binary stream per the contract (split on b'\\n')."""
    for piece in stream:  # each piece ends with b"\n" except possibly the last
        yield piece[:-1] if piece.endswith(b"\n") else piece


def replay_bytes(data: bytes, now_ms: int, lateness_ms: int = 5000, skew_ms: int = 300_000) -> dict:
    """Convenience for tests: replay an in-memory recording."""
    import io

    replay = Replay(now_ms, lateness_ms, skew_ms)
    for line in iter_lines(io.BytesIO(data)):
        replay.feed_line(line)
    return replay.result()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--input", required=True, help="NDJSON recording")
    parser.add_argument("--lateness-ms", type=int, default=5000)
    parser.add_argument("--skew-ms", type=int, default=300_000)
    parser.add_argument("--now-ms", type=int, default=None, help="default: wall clock")
    args = parser.parse_args(argv)

    now_ms = args.now_ms if args.now_ms is not None else int(time.time() * 1000)
    replay = Replay(now_ms, args.lateness_ms, args.skew_ms)
    with open(args.input, "rb") as f:
        for line in iter_lines(f):
            replay.feed_line(line)
    json.dump(replay.result(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
