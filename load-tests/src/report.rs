//! What a run shows: achieved rate, reading → `alert:critical` latency percentiles
//! (hdrhistogram), rejected, lost (acknowledged by the broker but not stored), expected
//! alerts missed or extra — as JSON, a console table, and an HTML page with charts (inline
//! SVG: no script, nothing fetched).

use crate::mqtt::{Plan, Sent};
use crate::observe::Seen;
use crate::scenario::Scenario;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub run: String,
    pub devices: usize,
    pub mode: String,
    /// Readings per second asked for, at the base rate and at the busiest phase.
    pub target_rate: f64,
    pub peak_target_rate: f64,
    pub sent: u64,
    pub acknowledged: u64,
    pub malformed_sent: u64,
    pub reconnects: u64,
    /// Acknowledged well-formed readings per second of sending.
    pub achieved_rate: f64,
    pub send_seconds: f64,
    /// How far the sender fell behind its schedule at worst, ms.
    pub max_send_lag_ms: f64,
    pub per_second: Vec<u64>,
    pub phases: Vec<PhaseResult>,
    pub stored: u64,
    /// Acknowledged by the broker, not in the database.
    pub lost: u64,
    pub lost_examples: Vec<String>,
    /// From vitalstream's /metrics.
    pub accepted: f64,
    pub rejected: f64,
    pub expected_alerts: usize,
    pub alerts_seen: usize,
    pub missed_alerts: usize,
    pub extra_alerts: usize,
    /// Reading (its due time) → `alert:critical` at the socket.io client, ms.
    pub alert_latency_ms: Latency,
    /// Its two parts, split at the alert's `raised_at` (whole ms on vitalstream's clock, so
    /// each part is off by up to 1 ms): due → raised (sender, broker, vitalstream's engine)
    /// and raised → socket.io client (the push).
    pub raise_latency_ms: Latency,
    pub push_latency_ms: Latency,
    /// vitalstream's own receipt → raise, from its /metrics (every alert of the run), ms:
    /// p50, p99, max. Due → raised less this is the sender and the broker.
    pub engine_latency_ms: [f64; 3],
    pub cpu_seconds: f64,
    /// Of one core, over the sending time.
    pub cpu_percent: f64,
    pub peak_rss_mb: f64,
    /// Of one core, over the sending time: the load generator (this process), and the
    /// broker when the run started its own.
    pub harness_cpu_percent: f64,
    pub broker_cpu_percent: Option<f64>,
    /// No reading lost, no alert missed or extra.
    pub ok: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// Percentiles in ms of a histogram in µs.
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PhaseResult {
    pub target_rate: f64,
    pub achieved_rate: f64,
}

/// The alerts seen, held against the ones the episodes expect.
pub struct Alerts {
    /// (device, episode): an episode expects an alert for a device when at least one of its
    /// anomalous readings reached the broker.
    pub expected: HashSet<(u32, usize)>,
    /// The expected ones seen (the first alert of each).
    pub matched: HashSet<(u32, usize)>,
    /// Alerts no episode asked for, or a second alert for one that did.
    pub extra: usize,
    /// Reading (its due time) → `alert:critical`, µs, for each matched alert.
    pub histogram: Histogram<u64>,
    /// Due → `raised_at`, and `raised_at` → seen, µs.
    pub to_raise: Histogram<u64>,
    pub to_client: Histogram<u64>,
}

impl Alerts {
    /// `acked`: the readings the broker acknowledged.
    pub fn tally(plan: &Plan, sent: &Sent, acked: &HashSet<(u32, u64)>, seen: &[Seen]) -> Alerts {
        let anomalies = sent.anomalies.lock().unwrap();
        let expected = (anomalies.iter())
            .filter(|(k, _)| acked.contains(k))
            .map(|((d, _), (e, _))| (*d, *e))
            .collect();
        let new = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        let (mut histogram, mut to_raise, mut to_client) = (new(), new(), new());
        let mut matched = HashSet::new();
        let mut extra = 0;
        let prefix = format!("{}-", plan.run);
        for s in seen {
            let a = &s.alert;
            let reading = (a["correlation_id"].as_str())
                .and_then(|c| c.strip_prefix(&prefix))
                .and_then(|c| c.split_once('-'))
                .and_then(|(d, seq)| Some((d.parse::<u32>().ok()?, seq.parse::<u64>().ok()?)));
            let hit = reading.and_then(|r| Some((r, *anomalies.get(&r)?)));
            match hit {
                Some(((d, _), (e, due_us)))
                    if a["rule_id"] == "lt_hr_high" && matched.insert((d, e)) =>
                {
                    let _ = histogram.record(s.at_us.saturating_sub(due_us).max(1));
                    if let Some(raised_us) = a["raised_at"].as_u64().map(|ms| ms * 1000) {
                        let _ = to_raise.record(raised_us.saturating_sub(due_us).max(1));
                        let _ = to_client.record(s.at_us.saturating_sub(raised_us).max(1));
                    }
                }
                _ => extra += 1,
            }
        }
        Alerts {
            expected,
            matched,
            extra,
            histogram,
            to_raise,
            to_client,
        }
    }

    /// Every expected alert has been seen.
    pub fn complete(&self) -> bool {
        self.expected.is_subset(&self.matched)
    }
}

pub struct Inputs<'a> {
    pub scenario: &'a Scenario,
    pub plan: &'a Plan,
    pub sent: &'a Sent,
    pub seen: &'a [Seen],
    /// The readings the broker acknowledged.
    pub acked: &'a HashSet<(u32, u64)>,
    pub stored: &'a [(u32, u64)],
    pub metrics: &'a HashMap<String, f64>,
    pub send_seconds: f64,
    pub cpu_seconds: f64,
    pub harness_cpu_seconds: f64,
    pub broker_cpu_seconds: Option<f64>,
    pub peak_rss_mb: f64,
}

impl Report {
    pub fn build(i: Inputs) -> Report {
        use std::sync::atomic::Ordering::Relaxed;
        let t = &i.scenario.traffic;
        let stored: HashSet<(u32, u64)> = i.stored.iter().copied().collect();
        let mut lost: Vec<&(u32, u64)> = (i.acked.iter()).filter(|r| !stored.contains(r)).collect();
        lost.sort_unstable();
        let Alerts {
            expected,
            matched,
            extra,
            histogram,
            to_raise,
            to_client,
        } = Alerts::tally(i.plan, i.sent, i.acked, i.seen);
        let per_second = i.sent.per_second.lock().unwrap().clone();
        let base = match &i.scenario.recorded {
            Some(r) => r.readings.len() as f64 / i.scenario.duration().as_secs_f64(),
            None => t.devices as f64 * t.rate_hz,
        };
        let mut phases = Vec::new();
        let mut second = 0usize;
        for p in i.scenario.phases() {
            let n = p.duration.as_secs().max(1) as usize;
            // The first half second of the run is the start offset; skip each phase's edges.
            let window = per_second.iter().skip(second + 1).take(n.saturating_sub(1));
            let (sum, count) = window.fold((0u64, 0usize), |(s, c), v| (s + v, c + 1));
            phases.push(PhaseResult {
                target_rate: base * p.rate_multiplier,
                achieved_rate: if count > 0 {
                    sum as f64 / count as f64
                } else {
                    0.0
                },
            });
            second += n;
        }
        let missed = expected.difference(&matched).count();
        let metric = |name: &str| i.metrics.get(name).copied().unwrap_or(0.0);
        let acknowledged = i.sent.acked.load(Relaxed);
        Report {
            scenario: i.scenario.name.clone(),
            run: i.plan.run.clone(),
            devices: i.plan.devices,
            mode: format!("{:?}", t.mode).to_lowercase(),
            target_rate: base,
            peak_target_rate: i
                .scenario
                .phases()
                .iter()
                .map(|p| p.rate_multiplier)
                .fold(0.0, f64::max)
                * base,
            sent: i.sent.sent.load(Relaxed),
            acknowledged,
            malformed_sent: i.sent.bad.load(Relaxed),
            reconnects: i.sent.reconnects.load(Relaxed),
            achieved_rate: acknowledged as f64 / i.send_seconds.max(1e-9),
            send_seconds: i.send_seconds,
            max_send_lag_ms: i.sent.lag_max_us.load(Relaxed) as f64 / 1000.0,
            per_second,
            phases,
            stored: stored.len() as u64,
            lost: lost.len() as u64,
            lost_examples: (lost.iter().take(10))
                .map(|(d, seq)| format!("{} seq {seq}", i.plan.device(*d as usize)))
                .collect(),
            accepted: metric("vitalstream_readings_accepted_total"),
            rejected: metric("vitalstream_readings_rejected_total"),
            expected_alerts: expected.len(),
            alerts_seen: i.seen.len(),
            missed_alerts: missed,
            extra_alerts: extra,
            alert_latency_ms: Latency::of(&histogram),
            raise_latency_ms: Latency::of(&to_raise),
            push_latency_ms: Latency::of(&to_client),
            engine_latency_ms: ["0.5", "0.99", "1"].map(|q| {
                1000.0
                    * metric(&format!(
                        "vitalstream_alert_latency_seconds{{quantile=\"{q}\"}}"
                    ))
            }),
            cpu_seconds: i.cpu_seconds,
            cpu_percent: 100.0 * i.cpu_seconds / i.send_seconds.max(1e-9),
            peak_rss_mb: i.peak_rss_mb,
            harness_cpu_percent: 100.0 * i.harness_cpu_seconds / i.send_seconds.max(1e-9),
            broker_cpu_percent: (i.broker_cpu_seconds)
                .map(|c| 100.0 * c / i.send_seconds.max(1e-9)),
            ok: lost.is_empty() && missed == 0 && extra == 0,
        }
    }

    /// The console table.
    pub fn table(&self) -> String {
        let l = &self.alert_latency_ms;
        let rows = [
            ("scenario", format!("{} (run {})", self.scenario, self.run)),
            ("devices", format!("{} ({})", self.devices, self.mode)),
            (
                "target rate",
                format!(
                    "{:.0}/s (peak {:.0}/s)",
                    self.target_rate, self.peak_target_rate
                ),
            ),
            (
                "achieved rate",
                format!(
                    "{:.0}/s over {:.1} s",
                    self.achieved_rate, self.send_seconds
                ),
            ),
            (
                "sent / acknowledged",
                format!("{} / {}", self.sent, self.acknowledged),
            ),
            (
                "malformed sent / rejected",
                format!("{} / {}", self.malformed_sent, self.rejected),
            ),
            ("stored / lost", format!("{} / {}", self.stored, self.lost)),
            (
                "alerts expected / seen",
                format!("{} / {}", self.expected_alerts, self.alerts_seen),
            ),
            (
                "alerts missed / extra",
                format!("{} / {}", self.missed_alerts, self.extra_alerts),
            ),
            (
                "reading → alert:critical",
                format!(
                    "p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2} (n = {})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.count
                ),
            ),
            (
                "  due → raised",
                format!(
                    "p50 {:.1} ms, p99 {:.1}, max {:.1}",
                    self.raise_latency_ms.p50, self.raise_latency_ms.p99, self.raise_latency_ms.max
                ),
            ),
            (
                "  of which receipt → raised",
                format!(
                    "p50 {:.1} ms, p99 {:.1}, max {:.1} (vitalstream's /metrics)",
                    self.engine_latency_ms[0], self.engine_latency_ms[1], self.engine_latency_ms[2]
                ),
            ),
            (
                "  raised → client",
                format!(
                    "p50 {:.1} ms, p99 {:.1}, max {:.1}",
                    self.push_latency_ms.p50, self.push_latency_ms.p99, self.push_latency_ms.max
                ),
            ),
            ("max send lag", format!("{:.1} ms", self.max_send_lag_ms)),
            ("reconnects", self.reconnects.to_string()),
            (
                "vitalstream CPU",
                format!(
                    "{:.1} s ({:.0}% of a core)",
                    self.cpu_seconds, self.cpu_percent
                ),
            ),
            (
                "harness / broker CPU",
                format!(
                    "{:.0}% / {} of a core",
                    self.harness_cpu_percent,
                    self.broker_cpu_percent
                        .map_or("-".into(), |b| format!("{b:.0}%"))
                ),
            ),
            (
                "vitalstream peak RSS",
                format!("{:.0} MiB", self.peak_rss_mb),
            ),
            (
                "verdict",
                if self.ok {
                    "OK".into()
                } else {
                    "FAILED".into()
                },
            ),
        ];
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        for (n, p) in self.phases.iter().enumerate() {
            let _ = writeln!(
                out,
                "  phase {n}: target {:.0}/s, achieved {:.0}/s",
                p.target_rate, p.achieved_rate
            );
        }
        out
    }

    /// A page with the numbers and two charts, readable offline.
    pub fn html(&self) -> String {
        let l = &self.alert_latency_ms;
        let throughput = line_chart(
            "Acknowledged readings per second",
            &self
                .per_second
                .iter()
                .map(|v| *v as f64)
                .collect::<Vec<_>>(),
            "s",
        );
        let percentiles = bar_chart(
            "Reading → alert:critical latency (ms)",
            &[
                ("p50", l.p50),
                ("p90", l.p90),
                ("p99", l.p99),
                ("p99.9", l.p999),
                ("max", l.max),
            ],
        );
        let table: String = self
            .table()
            .lines()
            .map(|line| format!("<tr><td>{}</td></tr>", escape(line.trim())))
            .collect();
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>vitalstream load: {name}</title>\
             <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:960px}}\
             td{{font-family:monospace;padding:2px 8px}}svg{{margin:1em 0;border:1px solid #ddd}}</style>\
             </head><body><h1>{name}</h1><p>{verdict}</p><table>{table}</table>{throughput}{percentiles}\
             <details><summary>JSON</summary><pre>{json}</pre></details></body></html>\n",
            name = escape(&self.scenario),
            verdict = if self.ok {
                "OK: nothing lost, every expected alert and no other"
            } else {
                "FAILED"
            },
            json = escape(&serde_json::to_string_pretty(self).unwrap_or_default()),
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const W: f64 = 900.0;
const H: f64 = 260.0;
const PAD: f64 = 50.0;

fn line_chart(title: &str, values: &[f64], unit: &str) -> String {
    let max = values.iter().copied().fold(1.0, f64::max);
    let n = values.len().max(2) as f64 - 1.0;
    let points: String = (values.iter().enumerate())
        .map(|(i, v)| {
            let x = PAD + (W - 2.0 * PAD) * i as f64 / n;
            let y = H - PAD - (H - 2.0 * PAD) * v / max;
            format!("{x:.1},{y:.1} ")
        })
        .collect();
    format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>{title}</title>\
         <text x=\"{PAD}\" y=\"20\">{title}</text>\
         <text x=\"5\" y=\"{PAD}\">{max:.0}</text><text x=\"5\" y=\"{y0}\">0</text>\
         <text x=\"{xr}\" y=\"{yb}\">{len} {unit}</text>\
         <polyline fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\" points=\"{points}\"/></svg>",
        y0 = H - PAD,
        xr = W - PAD - 40.0,
        yb = H - 15.0,
        len = values.len(),
    )
}

fn bar_chart(title: &str, bars: &[(&str, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(1e-9, f64::max);
    let step = (W - 2.0 * PAD) / bars.len() as f64;
    let body: String = (bars.iter().enumerate())
        .map(|(i, (label, v))| {
            let h = (H - 2.0 * PAD) * v / max;
            let x = PAD + step * i as f64 + step * 0.15;
            format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"#d1242f\"/>\
                 <text x=\"{x:.1}\" y=\"{ly:.1}\">{label}: {v:.2}</text>",
                y = H - PAD - h,
                w = step * 0.7,
                ly = H - PAD + 18.0,
            )
        })
        .collect();
    format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>{title}</title>\
         <text x=\"{PAD}\" y=\"20\">{title}</text>{body}</svg>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_matched_to_their_readings_and_their_latency_split_at_the_raise() {
        let scenario: Scenario = toml::from_str(
            "name = \"t\"\n[traffic]\ndevices = 10\nrate_hz = 1.0\n\
             [[episode]]\nat = \"1s\"\nduration = \"1s\"\ndevices = 0.5\n",
        )
        .unwrap();
        let plan = Plan::new(&scenario, "lt1");
        let sent = Sent::default();
        let due_us = 1_700_000_000_000_000;
        (sent.anomalies.lock().unwrap()).insert((3, 7), (0, due_us));
        (sent.anomalies.lock().unwrap()).insert((4, 9), (0, due_us));
        let acked = HashSet::from([(3, 7), (4, 9)]);
        let alert = |device_seq: &str, at_us: u64| Seen {
            at_us,
            alert: serde_json::json!({
                "rule_id": "lt_hr_high",
                "correlation_id": format!("lt1-{device_seq}"),
                "raised_at": due_us / 1000 + 4,
            }),
        };
        // Device 3's alert: raised 4 ms after its reading was due, seen 2 ms after that;
        // then a second one for the same episode, which is extra. Device 4's never came.
        let seen = [alert("3-7", due_us + 6_000), alert("3-7", due_us + 9_000)];
        let a = Alerts::tally(&plan, &sent, &acked, &seen);
        assert_eq!(a.expected.len(), 2);
        assert_eq!(a.matched, HashSet::from([(3, 0)]));
        assert_eq!(a.extra, 1);
        assert!(!a.complete());
        let ms = |h: &Histogram<u64>| (h.len(), h.max() / 1000);
        assert_eq!(ms(&a.histogram), (1, 6));
        assert_eq!(ms(&a.to_raise), (1, 4));
        assert_eq!(ms(&a.to_client), (1, 2));
    }
}
