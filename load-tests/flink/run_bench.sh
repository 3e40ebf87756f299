#!/usr/bin/env bash
# Run the Flink SQL reference-rules baseline several times and print best / median.
#
#   load-tests/flink/run_bench.sh [INPUT] [RUNS] [extra reference_rules.py args...]
#
# Environment: PYTHON (default: python3 with PyFlink importable),
#              JVM_ARGS (default: -Xms4g -Xmx4g), MAX_TS_MS (default: 1767226100000,
#              i.e. the end of the standard 200 s recording + 300 s skew).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
input="${1:-/tmp/vs/big.ndjson}"
runs="${2:-3}"
shift $(( $# >= 2 ? 2 : $# ))
py="${PYTHON:-python3}"
export JVM_ARGS="${JVM_ARGS:--Xms4g -Xmx4g}"
max_ts="${MAX_TS_MS:-1767226100000}"
out="$(mktemp -d)"
for i in $(seq 1 "$runs"); do
  "$py" "$here/reference_rules.py" --input "$input" --max-ts-ms "$max_ts" "$@" \
    >"$out/run$i.json" 2>"$out/run$i.log" || { echo "run $i failed, see $out/run$i.log" >&2; exit 1; }
  cat "$out/run$i.json"
done
"$py" - "$out" "$runs" <<'EOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rs = [json.load(open(f"{out}/run{i}.json")) for i in range(1, runs + 1)]
job = sorted(r["job_seconds"] for r in rs)
tot = sorted(r["total_seconds"] for r in rs)
lines = rs[0]["lines"]
print(json.dumps({
    "runs": runs,
    "lines": lines,
    "best_job_seconds": job[0],
    "median_job_seconds": statistics.median(job),
    "best_readings_per_s": round(lines / job[0]),
    "median_readings_per_s": round(lines / statistics.median(job)),
    "best_total_seconds": tot[0],
    "median_total_seconds": statistics.median(tot),
    "median_total_readings_per_s": round(lines / statistics.median(tot)),
}))
EOF
