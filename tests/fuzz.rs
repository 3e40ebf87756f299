//! Fuzz targets for every parser of untrusted input (bolero). Under `cargo test` /
//! `cargo nextest` each target replays its committed corpus
//! (`tests/__fuzz__/fuzz__<target>/corpus/`) and a bounded number of random inputs, as a
//! regression guard; coverage-guided runs, for longer, use cargo-bolero (see the README's
//! "Fuzzing"). Each target asserts what must hold for any input: no panic, no hang, and a
//! refusal that is a named value rather than a crash.

mod common;

use axum::body::Body;
use axum::http::Request;
use bolero::check;
use common::{HR_RULE, Harness, rules};
use std::sync::OnceLock;
use tower::ServiceExt;
use vitalstream::api::auth::Role;
use vitalstream::api::{ApiConfig, ApiState, router};
use vitalstream::model::{ClockMode, FrameBatch, Vital};
use vitalstream::parse::{ParseOptions, Parser};
use vitalstream::sources::SourceHandle;

/// The payload parser (MQTT, Kafka and replay frames): every input is a sample or a named
/// rejection, and an accepted sample satisfies the contract.
#[test]
fn payload() {
    check!().for_each(|input: &[u8]| {
        let mut parser = Parser::new(
            ParseOptions {
                max_frame_bytes: 1 << 16,
                require_ts: false,
            },
            0,
        );
        for hint in [None, Some("bed-1")] {
            if let Ok(sample) = parser.parse(input, hint, 1_767_225_600_000_000) {
                assert!(vitalstream::parse::valid_id(&sample.device_id).is_some());
                assert!(
                    Vital::ALL.iter().any(|v| sample.vitals.get(*v).is_some()),
                    "at least one vital"
                );
                if let Some(h) = hint {
                    assert_eq!(sample.device_id.as_str(), h);
                }
            }
        }
    });
}

/// MQTT device status and technical-alert payloads, under any topic id: handled or
/// rejected with a reason (counted), never a crash; nothing but a valid id reaches the
/// alert book.
#[test]
fn device_messages() {
    let (tx, events) = crossbeam_channel::unbounded();
    let metrics = std::sync::Arc::new(vitalstream::metrics::Metrics::default());
    let ctx = vitalstream::sources::DeviceContext {
        book: std::sync::Arc::new(vitalstream::alerts::AlertBook::new(tx, metrics.clone())),
        registry: Default::default(),
        metrics: metrics.clone(),
        dead_letter: None,
        assignments: Default::default(),
    };
    let ctx = std::panic::AssertUnwindSafe(ctx);
    check!().for_each(move |input: &[u8]| {
        // The first byte picks the topic id: valid, or one that is not an id.
        let device = ["bed-1", "bad id", "", "-x"][input.first().map_or(0, |b| *b as usize % 4)];
        let payload = input.get(1..).unwrap_or_default();
        vitalstream::sources::mqtt::device_status(&ctx, 0, device, payload);
        vitalstream::sources::mqtt::device_alert(&ctx, 0, device, payload);
        for event in events.try_iter() {
            assert_eq!(event.alert.trigger.device_id.as_str(), "bed-1");
        }
    });
}

/// Pipeline TOML and the condition language inside it: a rule set or a list of problems.
#[test]
fn pipeline() {
    check!().for_each(|input: &[u8]| {
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = vitalstream::rules::parse_pipeline(text);
            let _ = vitalstream::rules::expr::parse(text);
        }
    });
}

/// SQL rule validation: accepted or refused with a reason, never a crash.
#[test]
fn sql_validation() {
    check!().for_each(|input: &[u8]| {
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = vitalstream::rules::sql::validate(text);
        }
    });
}

/// The replay reader: arbitrary bytes split into lines, none lost or invented.
#[test]
fn replay_reader() {
    check!().for_each(|input: &[u8]| {
        let (tx, rx) = crossbeam_channel::unbounded::<FrameBatch>();
        let handle = SourceHandle::to_channel(tx, 0, ClockMode::Replay { speed: 0.0 });
        let stats = vitalstream::sources::replay::run(input, handle, false).unwrap();
        let frames: usize = rx.try_iter().map(|b| b.frames.len()).sum();
        assert_eq!(frames as u64, stats.lines);
        assert!(frames <= input.len() / 2 + 1);
    });
}

/// One engine and router for the REST target, made once.
fn api() -> &'static (Harness, axum::Router, ApiState, tokio::runtime::Runtime) {
    static API: OnceLock<(Harness, axum::Router, ApiState, tokio::runtime::Runtime)> =
        OnceLock::new();
    API.get_or_init(|| {
        let h = Harness::start(&common::config(), rules(HR_RULE));
        let config = ApiConfig::default();
        let state = ApiState::new(&config, h.engine.control(), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (h, router(&config, state.clone()), state, rt)
    })
}

/// REST bodies: any body to every route that takes one is answered in the envelope with a
/// 2xx or 4xx — never a 5xx, a panic or a hang.
#[test]
fn rest_bodies() {
    let (_, router, state, rt) = api();
    let token = common::server::token(state, "fuzz-admin", Role::Admin, None);
    let routes = [
        "/api/v1/rules/test",
        "/api/v1/rules",
        "/api/v1/devices/bed-1/assign",
        "/api/v1/devices/bed-1/commands",
        "/api/v1/alerts/no-such-alert/acknowledge",
        "/api/v1/notifications",
        "/api/v1/reports",
    ];
    let (router, rt) = (
        std::panic::AssertUnwindSafe(router),
        std::panic::AssertUnwindSafe(rt),
    );
    check!().for_each(move |input: &[u8]| {
        for route in routes {
            let req = Request::builder()
                .method("POST")
                .uri(route)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from(input.to_vec()))
                .unwrap();
            let response = rt.block_on(router.clone().oneshot(req)).unwrap();
            let status = response.status();
            assert!(
                !status.is_server_error() || status.as_u16() == 503,
                "{route}: {status} for {:?}",
                String::from_utf8_lossy(input)
            );
            let body = rt
                .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("an envelope");
            assert!(v.get("success").is_some(), "{route}: {v}");
        }
    });
}
