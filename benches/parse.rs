//! Parsing: simd-json decoding plus the payload contract's validation, per reading.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vitalstream::parse::{ParseOptions, Parser};

mod common;

fn parse(c: &mut Criterion) {
    let lines = common::lines(1000, 10);
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("valid_readings", |b| {
        let mut parser = Parser::new(ParseOptions::default(), 0);
        b.iter(|| {
            for line in &lines {
                black_box(parser.parse(line.as_bytes(), None, 0).is_ok());
            }
        })
    });
    let bad: Vec<String> = lines
        .iter()
        .map(|l| l.replacen("\"spo2\":", "\"spo2\":true,\"was\":", 1))
        .collect();
    group.bench_function("rejected_readings", |b| {
        let mut parser = Parser::new(ParseOptions::default(), 0);
        b.iter(|| {
            for line in &bad {
                black_box(parser.parse(line.as_bytes(), None, 0).is_err());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
