#!/usr/bin/env python3
"""Self-test of the reference implementation and the recording generator.

Runs replay_reference.py's logic on tiny inline inputs and checks every
rejection reason, the line-splitting rules, lateness / duplicate handling and
the window counting of the three rules; then smoke-tests gen_recording.py
(determinism and the disorder bound).  Standard library only:

    python3 tests/reference/selftest.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import replay_reference as ref  # noqa: E402

NOW = 1_798_761_600_000  # 2027-01-01T00:00:00Z
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def line(**fields) -> bytes:
    """A JSON line with the given fields (device_id/ts/hr defaults)."""
    obj = {"device_id": "bed-00001", "ts": T0, "hr": 70}
    for k, v in fields.items():
        if v is _DROP:
            obj.pop(k, None)
        else:
            obj[k] = v
    return json.dumps(obj).encode()


_DROP = object()


def reason(raw: bytes):
    r, _ = ref.validate_line(raw)
    return r


def replay(*lines: bytes, now=NOW, lateness=5000, skew=300_000, trailing_newline=True) -> dict:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    return ref.replay_bytes(data, now, lateness, skew)


def matches(result: dict) -> tuple:
    r = result["rules"]
    return (
        r["r1_hr_abnormal"]["matches"],
        r["r2_spo2_low_10s"]["matches"],
        r["r3_fever_60s"]["matches"],
    )


# --------------------------------------------------------------------------


def test_line_splitting():
    assert ref.replay_bytes(b"", NOW)["lines"] == 0
    assert ref.replay_bytes(b"\n", NOW)["lines"] == 1  # one empty line
    assert ref.replay_bytes(b"\n\n", NOW)["lines"] == 2
    good = line()
    res = ref.replay_bytes(good, NOW)  # no trailing newline: still a line
    assert res["lines"] == 1 and res["accepted"] == 1
    res = ref.replay_bytes(good + b"\n" + good, NOW)
    assert res["lines"] == 2 and res["accepted"] == 2 and res["duplicates"] == 1
    res = ref.replay_bytes(good + b"\n\n", NOW)
    assert res["lines"] == 2 and res["rejected_by_reason"] == {"invalid_json": 1}
    # \r before \n is JSON whitespace
    res = ref.replay_bytes(good + b"\r\n", NOW)
    assert res["accepted"] == 1
    assert res["lines"] == res["accepted"] + res["rejected"]


def test_too_large():
    pad_len = ref.MAX_LINE_BYTES - len(line(x=""))
    exact = line(x="y" * pad_len)
    assert len(exact) == ref.MAX_LINE_BYTES and reason(exact) is None
    over = line(x="y" * (pad_len + 1))
    assert len(over) == ref.MAX_LINE_BYTES + 1 and reason(over) == "too_large"
    assert reason(b"\xff" * (ref.MAX_LINE_BYTES + 1)) == "too_large"  # checked first


def test_invalid_json():
    cases = [
        b"",
        b"   ",
        b"\t\r",
        b"{",
        b'{"device_id":"bed-1","ts":1,"hr":70',
        line() + b" x",
        line() + b"{}",
        b'{"device_id":"bed-1","ts":1,"hr":NaN}',
        b'{"device_id":"bed-1","ts":1,"hr":Infinity}',
        b'{"device_id":"bed-1","ts":1,"hr":-Infinity}',
        b'{"device_id":"bed-1","ts":1,"hr":1e400}',
        b'{"device_id":"bed-1","ts":1,"hr":70,"x":-1e400}',  # unknown key too
        b'{"device_id":"bed-\xff","ts":1,"hr":70}',
        b'{"device_id":"bed-1","ts":1,"hr":70,"n":"\xed\xa0\x80"}',  # UTF-8 surrogate
        b'{"device_id":"bed-1","ts":1,"hr":70,"n":"\xc0\xaf"}',  # overlong
        b'\xef\xbb\xbf{"device_id":"bed-1","ts":1,"hr":70}',  # BOM
        b'{"device_id":"bed-1","ts":1,"hr":070}',  # leading zero
        b"{'device_id':'bed-1'}",
        b'{"device_id":"bed-1","ts":1,"hr":70,}',
        b'{"device_id":"bed-1","ts":1,"hr":70,"n":"a\tb"}',  # raw control char
        b"\x0c" + line(),  # form feed is not JSON whitespace
    ]
    for raw in cases:
        assert reason(raw) == "invalid_json", raw[:80]
    # whitespace around the value is fine
    assert reason(b" \t\r\n" + line() + b" \r\t") is None
    # tiny floats underflow to 0.0, which is fine
    assert reason(b'{"device_id":"a","ts":1,"hr":70,"x":1e-400}') is None


def nested(depth: int, kind: str = "[") -> str:
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def test_depth_limit():
    def with_unknown(value_text: str) -> bytes:
        return line()[:-1] + b', "deep": ' + value_text.encode() + b"}"

    # The top-level object is level 1, so 127 nested levels below it -> 128.
    for kind in ("[", "{"):
        assert reason(with_unknown(nested(127, kind))) is None
        assert reason(with_unknown(nested(128, kind))) == "invalid_json"
        assert reason(with_unknown(nested(500, kind))) == "invalid_json"
        assert reason(with_unknown(nested(2000, kind))) == "invalid_json"  # RecursionError
        top_level = "not_object" if kind == "[" else "missing_device_id"
        assert reason(nested(128, kind).encode()) == top_level
        assert reason(nested(129, kind).encode()) == "invalid_json"
    # many brackets inside strings do not count as nesting
    assert reason(line(note="[" * 300)) is None
    assert reason(line(note='\\"[' * 300)) is None  # escaped quotes inside strings
    # depth counts in the text even if a later duplicate key overwrites the value
    assert reason(with_unknown(nested(128) + ', "deep": 1')) == "invalid_json"
    assert reason(with_unknown(nested(127) + ', "deep": 1')) is None
    # wide but shallow is fine
    assert reason(line(x=[[1]] * 300)) is None


def test_not_object():
    for raw in (b"[]", b"[" + line() + b"]", b"42", b'"s"', b"null", b"true", b" false "):
        assert reason(raw) == "not_object", raw


def test_device_id():
    assert reason(line(device_id=_DROP)) == "missing_device_id"
    for bad in (None, 42, True, ["bed-1"], {"a": 1}, "", "../../etc/passwd", "a b", "dev*",
                "-starts-with-dash", "_x", ".x", "d" * 65, "bed-1\n", "b\u00e9d",
                "bed-\u0663", "bed/1", "x\u0000"):
        assert reason(line(device_id=bad)) == "bad_device_id", bad
    for good in ("a", "Z", "0", "d" * 64, "A:b.c_d-e", "bed-00001", "9-:._"):
        assert reason(line(device_id=good)) is None, good
    # device_id is checked before everything after it
    assert reason(line(device_id="a b", ts="x", hr="y")) == "bad_device_id"


def test_patient_id():
    assert reason(line(patient_id="pat-00001")) is None
    assert reason(line(patient_id="p" * 64)) is None
    for bad in (None, 42, "", "pat 1", "p" * 65, ["p"], "-p"):
        assert reason(line(patient_id=bad)) == "bad_patient_id", bad
    assert reason(line(patient_id=None, ts="bad")) == "bad_patient_id"


def test_ts():
    assert reason(line(ts=_DROP)) == "missing_ts"
    assert reason(line(ts=_DROP, hr=_DROP)) == "missing_ts"  # before no_vitals
    for good in (0, 1, T0, ref.MAX_TS_MS):
        assert reason(line(ts=good)) is None, good
    for bad in (-1, ref.MAX_TS_MS + 1, 1.0, 1767225600000.5, True, False, None, [T0], {"v": 1}):
        assert reason(line(ts=bad)) == "bad_ts", bad
    # -0 is an integer in the RFC 8259 grammar (no fraction, no exponent), so
    # it is ts 0.  NB: serde_json parses a bare -0 as the float -0.0.
    assert reason(b'{"device_id":"a","ts":-0,"hr":70}') is None
    # 1e3 is a float in JSON terms
    assert reason(b'{"device_id":"a","ts":1e3,"hr":70}') == "bad_ts"
    assert reason(b'{"device_id":"a","ts":1000,"hr":70}') is None

    p = ref.parse_rfc3339_ms
    assert p("1970-01-01T00:00:00Z") == 0
    assert p("1970-01-01t00:00:00z") == 0
    assert p("2026-01-01T00:00:01.234Z") == T0 + 1234
    assert p("2026-01-01T02:00:01.234+02:00") == T0 + 1234
    assert p("2025-12-31T18:30:01.234-05:30") == T0 + 1234
    assert p("2026-01-01T00:00:01.2349999Z") == T0 + 1234  # floored, not rounded
    assert p("2026-01-01T00:00:01.999999999Z") == T0 + 1999
    assert p("2026-01-01T00:00:01.5Z") == T0 + 1500
    assert p("2026-01-01T00:00:01.05Z") == T0 + 1050
    assert p("2026-01-01T00:00:00+23:59") == T0 - (23 * 60 + 59) * 60_000
    assert p("2024-02-29T00:00:00Z") == 1_709_164_800_000
    assert p("2000-02-29T00:00:00Z") == 951_782_400_000
    assert p("9999-12-31T23:59:59.999Z") == ref.MAX_TS_MS
    for bad in ("2026-02-29T00:00:00Z", "1900-02-29T00:00:00Z", "2026-04-31T00:00:00Z",
                "2026-00-01T00:00:00Z", "2026-13-01T00:00:00Z", "2026-01-00T00:00:00Z",
                "2026-01-01T24:00:00Z", "2026-01-01T00:60:00Z", "2026-01-01T00:00:60Z",
                "2026-01-01T00:00:00+24:00", "2026-01-01T00:00:00+00:60",
                "2026-01-01 00:00:00Z", "2026-01-01T00:00:00", "2026-01-01T00:00:00.Z",
                "2026-01-01T00:00:00.1234567890Z", "2026-01-01T00:00:00+0200",
                "2026-01-01T00:00:00+02", "2026-1-01T00:00:00Z", "12026-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z ", " 2026-01-01T00:00:00Z", "\u0662026-01-01T00:00:00Z",
                "2026-01-01T00:00:00UTC", "yesterday", ""):
        assert p(bad) is None, bad
        assert reason(line(ts=bad)) == "bad_ts", bad
    # valid syntax, but outside 0..=MAX_TS_MS
    for out in ("1969-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999-00:01",
                "1970-01-01T00:00:00+00:01", "0000-01-01T00:00:00Z"):
        assert reason(line(ts=out)) == "bad_ts", out
    assert reason(line(ts="1970-01-01T01:00:00+01:00")) is None
    assert reason(line(ts="9999-12-31T23:59:59.999Z")) is None


def test_seq():
    for good in (0, 1, 2**64 - 1):
        assert reason(line(seq=good)) is None, good
    for bad in (-1, 2**64, 1.0, 5.5, None, True, "7", [1]):
        assert reason(line(seq=bad)) == "bad_seq", bad
    assert reason(b'{"device_id":"a","ts":1,"seq":1e2,"hr":70}') == "bad_seq"
    assert reason(line(seq=-1, hr="x")) == "bad_seq"  # before vitals


def test_vitals():
    ranges = {"hr": (0, 300), "spo2": (0, 100), "temp": (25, 45),
              "sys_bp": (0, 300), "dia_bp": (0, 300), "rr": (0, 100)}
    for name, (lo, hi) in ranges.items():
        base = {"hr": _DROP, name: lo}
        assert reason(line(**base)) is None
        assert reason(line(**{**base, name: hi})) is None
        assert reason(line(**{**base, name: float(hi)})) is None
        assert reason(line(**{**base, name: (lo + hi) / 2})) is None
        assert reason(line(**{**base, name: hi + 0.001})) == f"out_of_range:{name}"
        assert reason(line(**{**base, name: lo - 0.001})) == f"out_of_range:{name}"
        assert reason(line(**{**base, name: 10**30})) == f"out_of_range:{name}"
        for bad in ("80", True, False, None, [80], {"v": 80}):
            assert reason(line(**{**base, name: bad})) == f"bad_type:{name}", (name, bad)
    # order: hr, spo2, temp, sys_bp, dia_bp, rr; the first failing vital wins,
    # whatever the kind of failure and the key order in the line
    assert reason(line(rr="x", hr=301)) == "out_of_range:hr"
    assert reason(line(hr=70, temp=50, spo2="x")) == "bad_type:spo2"
    assert reason(line(hr=70, dia_bp=None, sys_bp=301)) == "out_of_range:sys_bp"
    # -0 and -0.0 are in range
    assert reason(b'{"device_id":"a","ts":1,"hr":-0.0}') is None
    # huge integer literal (more than Python's default 4300 digits)
    assert reason(b'{"device_id":"a","ts":1,"hr":1' + b"0" * 5000 + b"}") == "out_of_range:hr"


def test_no_vitals_and_unknown_keys():
    assert reason(line(hr=_DROP)) == "no_vitals"
    assert reason(line(hr=_DROP, seq=3, patient_id="p", x="y")) == "no_vitals"
    assert reason(line(HR=70, hr=_DROP)) == "no_vitals"  # keys are case-sensitive
    # a lone surrogate escape is allowed by the RFC 8259 grammar, so it is
    # accepted in an ignored key (NB: serde_json rejects it).
    assert reason(b'{"device_id":"a","ts":1,"hr":70,"note":"\\ud800"}') is None
    # unknown keys of any type are ignored
    assert reason(line(x=None, y=[1, {"z": [True]}], note="n" * 100_000, Hr="bad")) is None


def test_duplicate_keys_last_wins():
    assert reason(b'{"device_id":"a","ts":1,"hr":"x","hr":80}') is None
    assert reason(b'{"device_id":"a","ts":1,"hr":80,"hr":301}') == "out_of_range:hr"
    assert reason(b'{"device_id":"a b","device_id":"a","ts":1,"hr":80}') is None
    res = replay(b'{"device_id":"a","ts":1,"hr":80,"hr":130}', now=10**6)
    assert matches(res) == (1, 0, 0)


def test_future_ts():
    # relative to now
    res = replay(line(ts=NOW + 300_000), line(ts=NOW + 300_001, device_id="b"), now=NOW)
    assert res["accepted"] == 1 and res["rejected_by_reason"] == {"future_ts": 1}
    # relative to the max accepted ts; rejected readings do not move it
    res = replay(
        line(ts=T0),
        line(ts=T0 + 300_001, device_id="b"),   # future
        line(ts=T0 + 300_000, device_id="c"),   # ok -> max = T0+300000
        line(ts=T0 + 600_000, device_id="d"),   # ok (exactly max + skew)
        line(ts=T0 + 900_001, device_id="e"),   # future
    )
    assert res["accepted"] == 3 and res["rejected_by_reason"] == {"future_ts": 2}
    # the first reading is only checked against now
    res = replay(line(ts=T0 + 3_600_000), line(ts=T0, device_id="b"))
    assert res["accepted"] == 2 and res["late"] == 1
    # validation failures come first
    res = replay(line(ts=NOW * 2, hr="x"))
    assert res["rejected_by_reason"] == {"bad_type:hr": 1}


def test_late():
    res = replay(
        line(ts=T0 + 10_000, device_id="a"),
        line(ts=T0 + 5_000, device_id="b"),   # == max - lateness: not late
        line(ts=T0 + 4_999, device_id="c", hr=130),  # late, not evaluated
        line(ts=T0 + 20_000, device_id="d"),
        line(ts=T0 + 16_000, device_id="e", hr=130),  # on time, evaluated
    )
    assert res["accepted"] == 5 and res["late"] == 1 and res["duplicates"] == 0
    assert matches(res) == (1, 0, 0)
    # the watermark uses readings accepted BEFORE this one only
    res = replay(line(ts=T0, device_id="a"), line(ts=T0 + 100_000, device_id="b"))
    assert res["late"] == 0
    # lateness 0: anything strictly behind the max is late
    res = replay(line(ts=T0 + 1, device_id="a"), line(ts=T0, device_id="b"), lateness=0)
    assert res["late"] == 1


def test_duplicates():
    # same ts, same device
    res = replay(line(ts=T0), line(ts=T0, hr=130))
    assert (res["accepted"], res["duplicates"], matches(res)[0]) == (2, 1, 0)
    # same ts, other device: not a duplicate
    res = replay(line(ts=T0), line(ts=T0, device_id="b"))
    assert res["duplicates"] == 0
    # same seq, other ts
    res = replay(line(ts=T0, seq=5), line(ts=T0 + 1, seq=5))
    assert res["duplicates"] == 1
    # seq only compared when both have one
    res = replay(line(ts=T0, seq=5), line(ts=T0 + 1), line(ts=T0 + 2, seq=5))
    assert res["duplicates"] == 1
    res = replay(line(ts=T0), line(ts=T0 + 1, seq=0), line(ts=T0 + 2, seq=1))
    assert res["duplicates"] == 0
    # a duplicate is not remembered: its seq/ts do not create new duplicates
    res = replay(line(ts=T0, seq=1), line(ts=T0 + 1, seq=1), line(ts=T0 + 1, seq=2))
    assert res["duplicates"] == 1
    # a duplicate that is also late counts only as duplicate
    res = replay(line(ts=T0, device_id="a"), line(ts=T0 + 60_000, device_id="b"),
                 line(ts=T0, device_id="a"))
    assert (res["duplicates"], res["late"]) == (1, 0)
    # a late non-duplicate is remembered for later duplicate checks
    res = replay(line(ts=T0 + 60_000, device_id="b"), line(ts=T0, device_id="a"),
                 line(ts=T0, device_id="a"))
    assert (res["duplicates"], res["late"]) == (1, 1)
    # future_ts rejections are not remembered
    res = replay(line(ts=T0), line(ts=T0 + 400_000, seq=9), line(ts=T0 + 1, seq=9))
    assert (res["rejected"], res["duplicates"]) == (1, 0)


def test_r1():
    res = replay(*(line(ts=T0 + i, hr=v) for i, v in enumerate((120, 120.5, 121, 40, 39.9, 0, 300, 70))))
    assert matches(res) == (5, 0, 0)  # 120.5, 121, 39.9, 0, 300
    res = replay(line(hr=_DROP, rr=10))
    assert matches(res) == (0, 0, 0)


def test_r2_windows():
    t = T0  # a multiple of 10000
    res = replay(
        # device a, window [t, t+10000): avg (85+94)/2 = 89.5 -> match
        line(device_id="a", ts=t, spo2=85),
        line(device_id="a", ts=t + 4_000, spo2=94),
        # device b shares the first window with a but has its own: 89.9 -> match
        line(device_id="b", ts=t + 5, spo2=89.9),
        # device c: readings without spo2 create no window
        line(device_id="c", ts=t + 6, hr=80),
        # device a, next window: avg exactly 90 -> no match
        line(device_id="a", ts=t + 10_000, spo2=88),
        line(device_id="a", ts=t + 10_001, spo2=92),
        line(device_id="a", ts=t + 10_002, hr=70),  # no spo2: does not count
    )
    assert res["late"] == 0 and matches(res) == (0, 2, 0)
    # late readings do not join windows
    res = replay(line(ts=t + 20_000, spo2=99), line(ts=t, spo2=50))
    assert res["late"] == 1 and matches(res) == (0, 0, 0)
    # alignment to the epoch
    assert replay(line(ts=9_999, spo2=80), line(ts=10_000, spo2=99), now=10**6)["rules"][
        "r2_spo2_low_10s"]["matches"] == 1
    assert replay(line(ts=9_999, spo2=80), line(ts=9_000, spo2=100), now=10**6)["rules"][
        "r2_spo2_low_10s"]["matches"] == 0


def test_r3_windows():
    w = ref.r3_window_starts
    assert w(0) == [-50_000, -40_000, -30_000, -20_000, -10_000, 0]
    assert w(9_999) == [-50_000, -40_000, -30_000, -20_000, -10_000, 0]
    assert w(59_999) == [0, 10_000, 20_000, 30_000, 40_000, 50_000]
    assert w(60_000) == [10_000, 20_000, 30_000, 40_000, 50_000, 60_000]
    for ts in (0, 1, 9_999, 10_000, 59_999, 60_000, T0 + 12_345):
        starts = w(ts)
        assert len(starts) == 6 and all(s % 10_000 == 0 and s <= ts < s + 60_000 for s in starts)

    # one fever reading -> 6 windows
    assert matches(replay(line(ts=T0, temp=39.5))) == (0, 0, 6)
    # 39.0 is not > 39.0
    assert matches(replay(line(ts=T0, temp=39.0))) == (0, 0, 0)
    # two fever readings 10 s apart share 5 windows -> 7 distinct windows
    assert matches(replay(line(ts=T0, temp=39.5), line(ts=T0 + 10_000, temp=40))) == (0, 0, 7)
    # max, not average: a normal reading in the same windows changes nothing
    assert matches(replay(line(ts=T0, temp=39.5), line(ts=T0 + 1, temp=36.0))) == (0, 0, 6)
    # per device
    assert matches(replay(line(ts=T0, temp=39.5), line(ts=T0 + 1, temp=39.5, device_id="b"))) == (0, 0, 12)
    # ts 59999 and 60000 overlap in 5 windows (10000..50000) -> 7 windows
    assert matches(replay(line(ts=59_999, temp=40), line(ts=60_000, temp=40), now=10**6)) == (0, 0, 7)


def test_cli_output_shape():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.ndjson")
        with open(path, "wb") as f:
            f.write(line(hr=130) + b"\n[]\n")
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "replay_reference.py"), "--input", path,
             "--now-ms", str(NOW)],
            check=True, capture_output=True,
        ).stdout
    res = json.loads(out)
    assert res == {
        "lines": 2,
        "accepted": 1,
        "rejected": 1,
        "rejected_by_reason": {"not_object": 1},
        "late": 0,
        "duplicates": 0,
        "rules": {
            "r1_hr_abnormal": {"matches": 1},
            "r2_spo2_low_10s": {"matches": 0},
            "r3_fever_60s": {"matches": 0},
        },
    }, res


def test_generator():
    gen = os.path.join(HERE, "gen_recording.py")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"r{i}.ndjson") for i in range(3)]
        for path, seed in zip(paths, (3, 3, 4)):
            subprocess.run(
                [sys.executable, gen, "--devices", "30", "--seconds", "40", "--seed", str(seed),
                 "--out", path, "--bad-rate", "0.1", "--huge-string-kb", "2",
                 "--deep-nesting", "300", "--too-large-lines", "1"],
                check=True, capture_output=True,
            )
        data = [open(p, "rb").read() for p in paths]
        assert data[0] == data[1], "same seed must give the same bytes"
        assert data[0] != data[2]

        # disorder bound over the valid generated readings (first occurrence)
        max_ts = None
        seen = set()
        readings = 0
        for raw in data[0].split(b"\n")[:-1]:
            if ref.validate_line(raw)[0] is not None:
                continue
            obj = json.loads(raw)
            if not (isinstance(obj.get("seq"), int) and isinstance(obj.get("ts"), (int, str))):
                continue
            key = (obj["device_id"], obj["seq"])
            if key in seen:  # redelivery
                continue
            seen.add(key)
            readings += 1
            ts = ref.parse_ts(obj["ts"])
            if max_ts is not None:
                assert max_ts - ts <= 2000, (max_ts, ts)
            max_ts = ts if max_ts is None else max(max_ts, ts)
        assert readings == 30 * 40

        res = ref.replay_bytes(data[0], NOW)
        assert res["rejected_by_reason"].get("too_large") == 1
        assert res["duplicates"] > 0 and res["rejected_by_reason"].get("future_ts")
        assert res["lines"] == res["accepted"] + res["rejected"]


def main() -> int:
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    for name, fn in tests:
        fn()
        print(f"ok  {name}")
    print(f"all {len(tests)} tests passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
