//! The whole engine on in-memory batches: parse workers, router, shards and the reference
//! rules, from frames to alerts (no file I/O, no sinks beyond counting); then the same with
//! r2 and r3 written as SQL rules, run by DataFusion in the SQL stage.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vitalstream::engine::{EndOfInput, Engine, EngineConfig, Outputs};
use vitalstream::model::{ClockMode, FrameBatch};
use vitalstream::rules::parse_pipeline;

mod common;

const PIPELINE: &str = include_str!("../pipelines/reference.toml");
const PIPELINE_SQL: &str = include_str!("../pipelines/reference-sql.toml");

fn batches(lines: &[String], per_batch: usize) -> Vec<FrameBatch> {
    lines
        .chunks(per_batch)
        .map(|chunk| {
            let mut batch = FrameBatch::new(0, ClockMode::Replay { speed: 0.0 });
            for line in chunk {
                batch.push(line.as_bytes(), 0, None);
            }
            batch
        })
        .collect()
}

fn engine(c: &mut Criterion) {
    // 2,000 devices × 100 s = 200,000 readings.
    let lines = common::lines(2000, 100);
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(lines.len() as u64));
    for (name, pipeline) in [
        ("reference_rules_2000_devices", PIPELINE),
        ("reference_rules_sql_2000_devices", PIPELINE_SQL),
    ] {
        let rules = parse_pipeline(pipeline).unwrap();
        group.bench_function(name, |b| {
            b.iter_batched(
                || batches(&lines, 4096),
                |input| {
                    let (alerts_tx, alerts_rx) = crossbeam_channel::unbounded();
                    let outputs = Outputs {
                        alerts: alerts_tx,
                        live: None,
                        readings: None,
                        rejects: None,
                        latest: None,
                    };
                    let mut engine =
                        Engine::start(&EngineConfig::default(), rules.clone(), outputs);
                    let mut source = engine.source(ClockMode::Replay { speed: 0.0 });
                    for batch in input {
                        source.send(batch);
                    }
                    drop(source);
                    engine.join(EndOfInput::CloseWindows);
                    alerts_rx.len()
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
