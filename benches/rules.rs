//! Rule evaluation on one device's state: threshold per reading, window add and close.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vitalstream::model::CorrelationId;
use vitalstream::rules::threshold::ThresholdState;
use vitalstream::rules::window::WindowState;
use vitalstream::rules::{RuleKind, parse_pipeline};

const PIPELINE: &str = include_str!("../pipelines/reference.toml");
const N: i64 = 10_000;

fn rules(c: &mut Criterion) {
    let set = parse_pipeline(PIPELINE).unwrap();
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(N as u64));
    let corr = CorrelationId::Generated(1);
    for rule in &set.rules {
        match &rule.kind {
            RuleKind::Threshold(t) => {
                group.bench_function(format!("threshold/{}", rule.id), |b| {
                    b.iter(|| {
                        let mut state = ThresholdState::default();
                        for i in 0..N {
                            let hr = 60.0 + (i % 90) as f64;
                            black_box(t.evaluate(&mut state, hr, i * 1000));
                        }
                    })
                });
            }
            RuleKind::Window(w) => {
                // One reading per second; windows close as they would under a watermark.
                group.bench_function(format!("window/{}", rule.id), |b| {
                    let mut out = Vec::new();
                    b.iter(|| {
                        let mut state = WindowState::new();
                        for i in 0..N {
                            let ts = i * 1000;
                            w.add(&mut state, ts, 90.0 + (i % 10) as f64 * 0.5, &corr, 0);
                            if i % 10 == 9 {
                                w.close(&mut state, ts - 5000, &mut out);
                                black_box(out.len());
                                out.clear();
                            }
                        }
                        w.close(&mut state, i64::MAX, &mut out);
                        out.clear();
                    })
                });
            }
            // Evaluated over whole windows by DataFusion: see benches/engine.rs.
            RuleKind::Sql(_) => {}
        }
    }
    group.finish();
}

criterion_group!(benches, rules);
criterion_main!(benches);
