#!/usr/bin/env python3
"""Apache Flink SQL baseline for vitalstream's reference rules (pipelines/reference.toml).

Runs one PyFlink Table API/SQL job on a local mini-cluster (streaming mode,
bounded filesystem source, event time with a 5 s bounded-out-of-orderness
watermark) that evaluates the three reference rules on an NDJSON recording:

  r1_hr_abnormal   readings with hr > 120 or hr < 40
  r2_spo2_low_10s  TUMBLE 10 s per device_id: windows with >= 1 spo2 and AVG(spo2) < 90
  r3_fever_60s     HOP 60 s / slide 10 s per device_id: windows with >= 1 temp and MAX(temp) > 39.0

and prints one JSON summary line:

  {"flink_version", "lines", "job_seconds", "total_seconds", "readings_per_s",
   "r1_matches", "r2_matches", "r3_matches", ...}

Modes
-----
--mode count (default): the three rule streams are tagged, UNION ALL'd and
    counted per rule (GROUP BY with mini-batch); the job result is collected
    to the client and the last count per rule is reported.
--mode blackhole: a StatementSet with three INSERT INTO blackhole sinks (the
    match rows of each rule).  Pure throughput, no counts (reported as null).

job_seconds is the job's net runtime reported by Flink (JobExecutionResult,
submission to finish inside the mini-cluster; JVM start, gateway start and
planning before submission excluded).  total_seconds is the wall time of this
script from start to the end of the job, including the JVM / py4j gateway
start, planning, mini-cluster start and collecting the result.
readings_per_s = lines / job_seconds, where lines counts every line of the
input file (as vitalstream does), valid or not.

Example
-------
  JVM_ARGS="-Xms4g -Xmx4g" python reference_rules.py --input /tmp/vs/big.ndjson \
      --max-ts-ms 1767226100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()


def count_lines(path: str) -> int:
    """Lines as vitalstream counts them: pieces split on b"\\n", minus a final empty one.

    A directory (input pre-split into several files) counts the lines of all its files.
    """
    if os.path.isdir(path):
        return sum(
            count_lines(os.path.join(path, f))
            for f in sorted(os.listdir(path))
            if not f.startswith((".", "_"))
        )
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            n += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        n += 1
    return n


# RFC 3339 as vitalstream accepts it: YYYY-MM-DD[Tt]hh:mm:ss[.f{1,9}]([Zz]|[+-]hh:mm)
RFC3339_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
INT_RE = r"^[0-9]{1,15}$"
DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def ts_ms_expr(handle_rfc3339: bool) -> str:
    """SQL expression: epoch ms of the `ts` column (read as STRING), or NULL."""
    int_branch = f"WHEN REGEXP(`ts`, {sql_str(INT_RE)}) THEN CAST(`ts` AS BIGINT)"
    if not handle_rfc3339:
        return f"(CASE {int_branch} ELSE CAST(NULL AS BIGINT) END)"
    # Session time zone is UTC, so UNIX_TIMESTAMP reads the local date-time as UTC.
    secs = "UNIX_TIMESTAMP(CONCAT(SUBSTR(`ts`, 1, 10), ' ', SUBSTR(`ts`, 12, 8)), 'yyyy-MM-dd HH:mm:ss')"
    # fraction: first 3 digits (right-padded with 0), i.e. floored to the millisecond
    frac = (
        "CAST(RPAD(COALESCE(REGEXP_EXTRACT(`ts`, '\\.([0-9]{1,9})', 1), ''), 3, '0') AS BIGINT)"
    )
    off_sign = "CASE WHEN SUBSTR(`ts`, CHAR_LENGTH(`ts`) - 5, 1) = '-' THEN -1 ELSE 1 END"
    off_min = (
        "(CAST(SUBSTR(`ts`, CHAR_LENGTH(`ts`) - 4, 2) AS BIGINT) * 60"
        " + CAST(SUBSTR(`ts`, CHAR_LENGTH(`ts`) - 1, 2) AS BIGINT))"
    )
    offset_ms = (
        f"(CASE WHEN UPPER(SUBSTR(`ts`, CHAR_LENGTH(`ts`), 1)) = 'Z' THEN CAST(0 AS BIGINT)"
        f" ELSE {off_sign} * {off_min} * 60000 END)"
    )
    rfc_branch = (
        f"WHEN REGEXP(`ts`, {sql_str(RFC3339_RE)}) THEN {secs} * 1000 + {frac} - {offset_ms}"
    )
    return f"(CASE {int_branch} {rfc_branch} ELSE CAST(NULL AS BIGINT) END)"


def build_ddl(path: str, min_ts: int, max_ts: int, handle_rfc3339: bool) -> str:
    ts_ms = ts_ms_expr(handle_rfc3339)
    # One computed column may not reference another, so the bound check is inlined.
    # The watermark assigner rejects NULL row times, so unusable rows get epoch 0:
    # it never advances the watermark, and the readings view drops those rows.
    rowtime = (
        f"CASE WHEN {ts_ms} BETWEEN {min_ts} AND {max_ts} "
        f"THEN TO_TIMESTAMP_LTZ({ts_ms}, 3) ELSE TO_TIMESTAMP_LTZ(0, 3) END"
    )
    return f"""
CREATE TEMPORARY TABLE raw_readings (
  device_id  STRING,
  patient_id STRING,
  `ts`       STRING,
  seq        BIGINT,
  hr         DOUBLE,
  spo2       DOUBLE,
  temp       DOUBLE,
  sys_bp     DOUBLE,
  dia_bp     DOUBLE,
  rr         DOUBLE,
  rowtime AS {rowtime},
  WATERMARK FOR rowtime AS rowtime - INTERVAL '5' SECOND
) WITH (
  'connector' = 'filesystem',
  'path' = {sql_str(path)},
  'format' = 'json',
  'json.ignore-parse-errors' = 'true',
  'json.fail-on-missing-field' = 'false'
)"""


# Row filter approximating vitalstream's validation (see README caveats).
READINGS_VIEW = f"""
CREATE TEMPORARY VIEW readings AS
SELECT device_id, rowtime, hr, spo2, temp
FROM raw_readings
WHERE rowtime > TO_TIMESTAMP_LTZ(0, 3)
  AND device_id IS NOT NULL
  AND REGEXP(device_id, {sql_str(DEVICE_ID_RE)})
  AND (hr     IS NULL OR hr     BETWEEN 0 AND 300)
  AND (spo2   IS NULL OR spo2   BETWEEN 0 AND 100)
  AND (temp   IS NULL OR temp   BETWEEN 25 AND 45)
  AND (sys_bp IS NULL OR sys_bp BETWEEN 0 AND 300)
  AND (dia_bp IS NULL OR dia_bp BETWEEN 0 AND 300)
  AND (rr     IS NULL OR rr     BETWEEN 0 AND 100)
  AND (hr IS NOT NULL OR spo2 IS NOT NULL OR temp IS NOT NULL
       OR sys_bp IS NOT NULL OR dia_bp IS NOT NULL OR rr IS NOT NULL)
"""

R1 = """
SELECT device_id, rowtime
FROM readings
WHERE hr > 120 OR hr < 40
"""

# AVG ignores NULL; filtering NULL spo2 first is equivalent to "windows with >= 1 spo2".
R2 = """
SELECT device_id, window_start, window_end, AVG(spo2) AS avg_spo2
FROM TABLE(TUMBLE(TABLE readings, DESCRIPTOR(rowtime), INTERVAL '10' SECOND))
WHERE spo2 IS NOT NULL
GROUP BY device_id, window_start, window_end
HAVING AVG(spo2) < 90
"""

R3 = """
SELECT device_id, window_start, window_end, MAX(temp) AS max_temp
FROM TABLE(HOP(TABLE readings, DESCRIPTOR(rowtime), INTERVAL '10' SECOND, INTERVAL '60' SECOND))
WHERE temp IS NOT NULL
GROUP BY device_id, window_start, window_end
HAVING MAX(temp) > 39.0
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--input", required=True, help="NDJSON recording (file, or a directory of parts)")
    p.add_argument("--parallelism", type=int, default=2)
    p.add_argument("--mode", choices=("count", "blackhole"), default="count")
    p.add_argument(
        "--max-ts-ms",
        type=int,
        default=None,
        help="readings with a later ts are dropped before the watermark (default: now + 300 s)",
    )
    p.add_argument("--min-ts-ms", type=int, default=1)
    p.add_argument(
        "--int-ts-only",
        action="store_true",
        help="drop RFC 3339 string timestamps instead of parsing them in SQL",
    )
    p.add_argument("--explain", action="store_true", help="print the plan to stderr")
    args = p.parse_args(argv)

    path = os.path.abspath(args.input)
    max_ts = args.max_ts_ms if args.max_ts_ms is not None else int(time.time() * 1000) + 300_000

    from pyflink.table import EnvironmentSettings, TableEnvironment
    from pyflink.version import __version__ as pyflink_version

    settings = EnvironmentSettings.in_streaming_mode()
    t_env = TableEnvironment.create(settings)
    conf = t_env.get_config()
    conf.set("parallelism.default", str(args.parallelism))
    conf.set("table.local-time-zone", "UTC")
    conf.set("pipeline.name", "vitalstream-reference-rules")
    # Mini-batch only matters for the final GROUP BY rule count in --mode count.
    conf.set("table.exec.mini-batch.enabled", "true")
    conf.set("table.exec.mini-batch.allow-latency", "1 s")
    conf.set("table.exec.mini-batch.size", "10000")

    t_env.execute_sql(build_ddl(path, args.min_ts_ms, max_ts, not args.int_ts_only))
    t_env.execute_sql(READINGS_VIEW)

    if args.mode == "count":
        query = f"""
SELECT `rule`, COUNT(*) AS n_matches FROM (
  SELECT 'r1_hr_abnormal'  AS `rule` FROM ({R1})
  UNION ALL
  SELECT 'r2_spo2_low_10s' AS `rule` FROM ({R2})
  UNION ALL
  SELECT 'r3_fever_60s'    AS `rule` FROM ({R3})
) GROUP BY `rule`"""
        if args.explain:
            print(t_env.explain_sql(query), file=sys.stderr)
        t_submit = time.perf_counter()
        result = t_env.execute_sql(query)
        counts = {"r1_hr_abnormal": 0, "r2_spo2_low_10s": 0, "r3_fever_60s": 0}
        from pyflink.common import RowKind

        with result.collect() as it:
            for row in it:
                if row.get_row_kind() in (RowKind.INSERT, RowKind.UPDATE_AFTER):
                    counts[row[0]] = row[1]
        client = result.get_job_client()
    else:
        for name, cols in (
            ("r1_sink", "device_id STRING, rowtime TIMESTAMP_LTZ(3)"),
            ("r2_sink", "device_id STRING, window_start TIMESTAMP(3), window_end TIMESTAMP(3), v DOUBLE"),
            ("r3_sink", "device_id STRING, window_start TIMESTAMP(3), window_end TIMESTAMP(3), v DOUBLE"),
        ):
            t_env.execute_sql(f"CREATE TEMPORARY TABLE {name} ({cols}) WITH ('connector' = 'blackhole')")
        stmt = t_env.create_statement_set()
        stmt.add_insert_sql(f"INSERT INTO r1_sink {R1}")
        stmt.add_insert_sql(f"INSERT INTO r2_sink {R2}")
        stmt.add_insert_sql(f"INSERT INTO r3_sink {R3}")
        if args.explain:
            print(stmt.explain(), file=sys.stderr)
        t_submit = time.perf_counter()
        result = stmt.execute()
        result.wait()
        counts = {"r1_hr_abnormal": None, "r2_spo2_low_10s": None, "r3_fever_60s": None}
        client = result.get_job_client()
    t_end = time.perf_counter()

    net_ms = None
    if client is not None:
        try:
            net_ms = client.get_job_execution_result().result().get_net_runtime()
        except Exception as e:  # pragma: no cover - depends on Flink version
            print(f"note: no JobExecutionResult ({e}); using client wall time", file=sys.stderr)
    submit_to_end = t_end - t_submit
    job_seconds = net_ms / 1000.0 if net_ms is not None else submit_to_end
    total_seconds = t_end - T_START

    lines = count_lines(path)
    summary = {
        "flink_version": pyflink_version,
        "mode": args.mode,
        "parallelism": args.parallelism,
        "lines": lines,
        "job_seconds": round(job_seconds, 3),
        "submit_to_result_seconds": round(submit_to_end, 3),
        "total_seconds": round(total_seconds, 3),
        "readings_per_s": round(lines / job_seconds),
        "r1_matches": counts["r1_hr_abnormal"],
        "r2_matches": counts["r2_spo2_low_10s"],
        "r3_matches": counts["r3_fever_60s"],
        "max_ts_ms": max_ts,
        "rfc3339_ts": not args.int_ts_only,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
