//! Parse: raw payload bytes → [`Sample`], or a named [`RejectReason`].
//!
//! The payload contract (see the README):
//! - a JSON object; unknown keys are ignored; when a key repeats, the last one wins;
//! - `device_id`: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`, required unless the transport gives
//!   one (an MQTT topic); when both do, they must agree;
//! - `patient_id`: optional, same pattern;
//! - `ts`: integer epoch milliseconds or an RFC 3339 string; optional for live sources;
//! - `hr`, `spo2`, `temp`, `sys_bp`, `dia_bp`, `rr`: JSON numbers within range, at least one;
//! - `seq`: optional non-negative integer;
//! - `correlation_id`: optional; used when it is a valid id, otherwise one is generated.
//!
//! A key that is present must hold a valid value: `null` is not "absent".

use crate::model::{CorrelationId, Id, Millis, RejectReason, Sample, Vital, Vitals};
use simd_json::{Buffers, Node, StaticNode, Tape};

/// Largest event time accepted: 9999-12-31T23:59:59.999Z.
const MAX_TS: i64 = 253_402_300_799_999;

/// How deep a payload may nest before it is rejected as `invalid_json`.
const MAX_DEPTH: usize = 128;

/// Settings for one parser.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Frames longer than this are rejected as `too_large` before any parsing.
    pub max_frame_bytes: usize,
    /// Replay requires `ts`; live sources fall back to the receive time.
    pub require_ts: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            max_frame_bytes: 1 << 20,
            require_ts: false,
        }
    }
}

/// A reusable parser: one per thread, so its scratch buffers are reused for every frame.
pub struct Parser {
    options: ParseOptions,
    buffers: Buffers,
    /// Kept between calls so its allocation is reused (its lifetime is reset each time).
    tape: Option<Tape<'static>>,
    scratch: Vec<u8>,
    next_correlation: u64,
}

impl Parser {
    /// `correlation_base` seeds generated correlation ids; give each parser its own range.
    pub fn new(options: ParseOptions, correlation_base: u64) -> Self {
        Parser {
            options,
            buffers: Buffers::with_max_depth(4096, MAX_DEPTH),
            tape: Some(Tape::null().reset()),
            scratch: Vec::with_capacity(4096),
            next_correlation: correlation_base,
        }
    }

    /// Whether `ts` is required (replay) or falls back to the receive time (live sources).
    pub fn set_require_ts(&mut self, required: bool) {
        self.options.require_ts = required;
    }

    /// Decodes and validates one payload.
    pub fn parse(
        &mut self,
        payload: &[u8],
        device_hint: Option<&str>,
        received_us: i64,
    ) -> Result<Sample, RejectReason> {
        if payload.len() > self.options.max_frame_bytes {
            return Err(RejectReason::TooLarge);
        }
        // Cheap check before the expensive parse: a JSON object starts with '{'.
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {}
            Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                // Possibly valid JSON that is not an object: let the parser decide which.
            }
            _ => return Err(RejectReason::InvalidJson),
        }
        // simd-json parses in place, so parse a copy: the original bytes stay intact for
        // the dead-letter output.
        let len = payload.len();
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        self.scratch.resize(len + simd_json::INPUT_PADDING, 0);
        let mut tape: Tape<'_> = self.tape.take().unwrap_or_else(Tape::null).reset();
        let result =
            match simd_json::fill_tape_padded(&mut self.scratch, len, &mut self.buffers, &mut tape)
            {
                Ok(()) => {
                    let correlation = self.next_correlation;
                    validate(
                        &tape.0,
                        device_hint,
                        received_us,
                        self.options.require_ts,
                        correlation,
                    )
                }
                Err(_) => Err(RejectReason::InvalidJson),
            };
        if result.is_ok() {
            self.next_correlation += 1;
        }
        self.tape = Some(tape.reset());
        result
    }
}

/// Number of tape nodes a value occupies, itself included.
fn node_span(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// The fields of interest, as tape nodes; later keys overwrite earlier ones.
#[derive(Default)]
struct Fields<'t> {
    device_id: Option<Node<'t>>,
    patient_id: Option<Node<'t>>,
    ts: Option<Node<'t>>,
    seq: Option<Node<'t>>,
    correlation_id: Option<Node<'t>>,
    vitals: [Option<Node<'t>>; 6],
}

fn collect_fields<'t>(nodes: &[Node<'t>]) -> Result<Fields<'t>, RejectReason> {
    let Some(&Node::Object { len, .. }) = nodes.first() else {
        return Err(RejectReason::NotObject);
    };
    let mut fields = Fields::default();
    let mut i = 1;
    for _ in 0..len {
        let (Some(Node::String(key)), Some(value)) = (nodes.get(i), nodes.get(i + 1)) else {
            return Err(RejectReason::InvalidJson);
        };
        let slot = match *key {
            "device_id" => Some(&mut fields.device_id),
            "patient_id" => Some(&mut fields.patient_id),
            "ts" => Some(&mut fields.ts),
            "seq" => Some(&mut fields.seq),
            "correlation_id" => Some(&mut fields.correlation_id),
            other => Vital::from_name(other).map(|v| &mut fields.vitals[v.index()]),
        };
        if let Some(slot) = slot {
            *slot = Some(*value);
        }
        i += 1 + node_span(value);
    }
    Ok(fields)
}

fn validate(
    nodes: &[Node<'_>],
    device_hint: Option<&str>,
    received_us: i64,
    require_ts: bool,
    correlation: u64,
) -> Result<Sample, RejectReason> {
    let fields = collect_fields(nodes)?;

    // A device id given by the transport (an MQTT topic segment) must be valid itself.
    let device_hint = match device_hint {
        Some(hint) => Some(valid_id(hint).ok_or(RejectReason::BadDeviceId)?),
        None => None,
    };
    let device_id: Id = match (fields.device_id, device_hint) {
        (None, None) => return Err(RejectReason::MissingDeviceId),
        (None, Some(hint)) => hint,
        (Some(node), hint) => {
            let id = node_id(&node).ok_or(RejectReason::BadDeviceId)?;
            if hint.is_some_and(|h| h != id) {
                return Err(RejectReason::DeviceIdMismatch);
            }
            id
        }
    };
    let patient_id = match fields.patient_id {
        None => None,
        Some(node) => Some(node_id(&node).ok_or(RejectReason::BadPatientId)?),
    };
    let ts = match fields.ts {
        None if require_ts => return Err(RejectReason::MissingTs),
        None => received_us.div_euclid(1000),
        Some(node) => parse_ts(&node).ok_or(RejectReason::BadTs)?,
    };
    let seq = match fields.seq {
        None => None,
        Some(Node::Static(StaticNode::U64(n))) => Some(n),
        Some(Node::Static(StaticNode::I64(n))) if n >= 0 => Some(n as u64),
        Some(_) => return Err(RejectReason::BadSeq),
    };
    let mut vitals = Vitals::default();
    for vital in Vital::ALL {
        let Some(node) = fields.vitals[vital.index()] else {
            continue;
        };
        let value = match node {
            Node::Static(StaticNode::F64(v)) => v,
            Node::Static(StaticNode::I64(v)) => v as f64,
            Node::Static(StaticNode::U64(v)) => v as f64,
            _ => return Err(RejectReason::BadType(vital)),
        };
        let (lo, hi) = vital.range();
        // `contains` is false for NaN and infinities, so they are out of range too.
        if !(lo..=hi).contains(&value) {
            return Err(RejectReason::OutOfRange(vital));
        }
        vitals.set(vital, value);
    }
    if vitals.is_empty() {
        return Err(RejectReason::NoVitals);
    }
    let correlation_id = match fields.correlation_id.as_ref().and_then(node_id) {
        Some(given) => CorrelationId::Given(given),
        None => CorrelationId::Generated(correlation),
    };
    Ok(Sample {
        device_id,
        patient_id,
        ts,
        received_us,
        vitals,
        seq,
        correlation_id,
        device_ts: fields.ts.is_some(),
        late: false,
        warmup: false,
    })
}

fn node_id(node: &Node<'_>) -> Option<Id> {
    match node {
        Node::String(s) => valid_id(s),
        _ => None,
    }
}

/// Checks an id against `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`.
pub fn valid_id(s: &str) -> Option<Id> {
    let bytes = s.as_bytes();
    let ok = matches!(bytes.first(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    ok.then(|| Id::new(s))
}

fn parse_ts(node: &Node<'_>) -> Option<Millis> {
    let ms = match node {
        Node::Static(StaticNode::I64(n)) => *n,
        Node::Static(StaticNode::U64(n)) => i64::try_from(*n).ok()?,
        Node::String(s) => parse_rfc3339_ms(s)?,
        _ => return None,
    };
    (0..=MAX_TS).contains(&ms).then_some(ms)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into epoch milliseconds, flooring the
/// fraction. Stricter than chrono alone: the separator must be `T` (or `t`), the offset must be
/// present, and at most nine fraction digits are allowed.
pub fn parse_rfc3339_ms(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let shape_ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape_ok {
        return None;
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return None;
        }
        rest = &rest[1 + n..];
    }
    let offset_ok = match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    };
    if !offset_ok || &b[17..19] == b"60" {
        return None;
    }
    let dt = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(dt.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Sample, RejectReason> {
        parse_with(line, None, true)
    }

    fn parse_with(
        line: &str,
        hint: Option<&str>,
        require_ts: bool,
    ) -> Result<Sample, RejectReason> {
        let options = ParseOptions {
            require_ts,
            ..ParseOptions::default()
        };
        Parser::new(options, 0).parse(line.as_bytes(), hint, 1_700_000_000_123_456)
    }

    fn reason(line: &str) -> String {
        parse(line).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_full_reading() {
        let s = parse(
            r#"{"device_id":"bed-1","patient_id":"p:9","ts":1700000000000,"seq":7,
                "hr":72,"spo2":97.5,"temp":36.6,"sys_bp":120,"dia_bp":80,"rr":14,"extra":{"a":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(s.device_id, "bed-1");
        assert_eq!(s.patient_id.as_deref(), Some("p:9"));
        assert_eq!(s.ts, 1_700_000_000_000);
        assert_eq!(s.seq, Some(7));
        assert_eq!(s.vitals.get(Vital::Hr), Some(72.0));
        assert_eq!(s.vitals.get(Vital::Spo2), Some(97.5));
        assert_eq!(s.vitals.get(Vital::Rr), Some(14.0));
        assert!(matches!(s.correlation_id, CorrelationId::Generated(_)));
    }

    #[test]
    fn rejects_what_is_not_json_or_not_an_object() {
        for line in [
            "",
            "   ",
            "{",
            r#"{"device_id":"a","hr":1} x"#,
            "\u{1}",
            "NaN",
        ] {
            assert_eq!(reason(line), "invalid_json", "{line:?}");
        }
        for line in ["[]", "1", "\"s\"", "null", "true"] {
            assert_eq!(reason(line), "not_object", "{line:?}");
        }
        let invalid_utf8 = b"{\"device_id\":\"a\xff\",\"hr\":1}";
        let r = Parser::new(ParseOptions::default(), 0).parse(invalid_utf8, None, 0);
        assert_eq!(r.unwrap_err(), RejectReason::InvalidJson);
        assert_eq!(
            reason(r#"{"device_id":"a","ts":1,"hr":NaN}"#),
            "invalid_json"
        );
        assert_eq!(
            reason(r#"{"device_id":"a","ts":1,"hr":1e400}"#),
            "invalid_json"
        );
        let deep = format!(
            r#"{{"device_id":"a","ts":1,"hr":1,"x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(reason(&deep), "invalid_json");
    }

    #[test]
    fn nesting_up_to_128_levels_is_allowed() {
        // The object itself is level 1; `x` adds `n` more.
        let nested = |n: usize| {
            format!(
                r#"{{"device_id":"a","ts":1,"hr":1,"x":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(parse(&nested(127)).is_ok());
        assert_eq!(parse(&nested(128)).unwrap_err(), RejectReason::InvalidJson);
    }

    #[test]
    fn crlf_line_endings_are_whitespace() {
        assert!(parse("{\"device_id\":\"a\",\"ts\":1,\"hr\":1}\r").is_ok());
        assert!(parse(" \t{\"device_id\":\"a\",\"ts\":1,\"hr\":1} ").is_ok());
    }

    #[test]
    fn device_id_rules() {
        assert_eq!(reason(r#"{"ts":1,"hr":1}"#), "missing_device_id");
        for id in [
            r#""""#,
            r#""a b""#,
            r#""../x""#,
            r#""-a""#,
            "5",
            "null",
            r#""dev*""#,
        ] {
            assert_eq!(
                reason(&format!(r#"{{"device_id":{id},"ts":1,"hr":1}}"#)),
                "bad_device_id",
                "{id}"
            );
        }
        let long = "a".repeat(65);
        assert_eq!(
            reason(&format!(r#"{{"device_id":"{long}","ts":1,"hr":1}}"#)),
            "bad_device_id"
        );
        let max = "a".repeat(64);
        assert!(parse(&format!(r#"{{"device_id":"{max}","ts":1,"hr":1}}"#)).is_ok());
        // Escapes are decoded before the check.
        assert_eq!(
            parse(r#"{"device_id":"d\u0031","ts":1,"hr":1}"#)
                .unwrap()
                .device_id,
            "d1"
        );
    }

    #[test]
    fn transport_device_id_must_agree() {
        let s = parse_with(r#"{"hr":60}"#, Some("bed-2"), false).unwrap();
        assert_eq!(s.device_id, "bed-2");
        assert_eq!(
            s.ts, 1_700_000_000_123,
            "receive time stands in for a missing ts"
        );
        assert_eq!(
            parse_with(r#"{"device_id":"bed-3","hr":60}"#, Some("bed-2"), false).unwrap_err(),
            RejectReason::DeviceIdMismatch
        );
        assert!(parse_with(r#"{"device_id":"bed-2","hr":60}"#, Some("bed-2"), false).is_ok());
        // A bad id in the topic is rejected even when the payload names a good one.
        assert_eq!(
            parse_with(r#"{"device_id":"bed-2","hr":60}"#, Some("bed+2"), false).unwrap_err(),
            RejectReason::BadDeviceId
        );
    }

    #[test]
    fn patient_id_rules() {
        assert_eq!(
            reason(r#"{"device_id":"a","patient_id":null,"ts":1,"hr":1}"#),
            "bad_patient_id"
        );
        assert_eq!(
            reason(r#"{"device_id":"a","patient_id":"x y","ts":1,"hr":1}"#),
            "bad_patient_id"
        );
        assert_eq!(
            parse(r#"{"device_id":"a","ts":1,"hr":1}"#)
                .unwrap()
                .patient_id,
            None
        );
    }

    #[test]
    fn ts_rules() {
        assert_eq!(reason(r#"{"device_id":"a","hr":1}"#), "missing_ts");
        for ts in [
            "1.5",
            "1e3",
            "-1",
            "true",
            "null",
            r#""yesterday""#,
            "253402300800000",
            r#""2026-01-01 00:00:00Z""#,
            r#""2026-01-01T00:00:00""#,
            r#""2026-02-30T00:00:00Z""#,
        ] {
            assert_eq!(
                reason(&format!(r#"{{"device_id":"a","ts":{ts},"hr":1}}"#)),
                "bad_ts",
                "{ts}"
            );
        }
        let at = |ts: &str| {
            parse(&format!(r#"{{"device_id":"a","ts":{ts},"hr":1}}"#))
                .unwrap()
                .ts
        };
        assert_eq!(at(r#""2026-01-01T00:00:01.2349Z""#), 1_767_225_601_234);
        assert_eq!(at(r#""2026-01-01T02:00:01.234+02:00""#), 1_767_225_601_234);
        assert_eq!(at("1767225601234"), 1_767_225_601_234);
        assert_eq!(at("0"), 0);
    }

    #[test]
    fn seq_rules() {
        for seq in ["-1", "1.0", r#""3""#, "null", "true"] {
            assert_eq!(
                reason(&format!(r#"{{"device_id":"a","ts":1,"seq":{seq},"hr":1}}"#)),
                "bad_seq",
                "{seq}"
            );
        }
        let s = parse(r#"{"device_id":"a","ts":1,"seq":18446744073709551615,"hr":1}"#).unwrap();
        assert_eq!(s.seq, Some(u64::MAX));
    }

    #[test]
    fn vital_types_and_ranges() {
        for (vital, bad) in [
            ("hr", r#""80""#),
            ("spo2", "true"),
            ("temp", "null"),
            ("rr", "[1]"),
            ("sys_bp", "{}"),
        ] {
            assert_eq!(
                reason(&format!(r#"{{"device_id":"a","ts":1,"{vital}":{bad}}}"#)),
                format!("bad_type:{vital}")
            );
        }
        for (vital, value) in [
            ("hr", "301"),
            ("hr", "-0.1"),
            ("spo2", "100.01"),
            ("temp", "24.9"),
            ("temp", "45.1"),
            ("sys_bp", "300.5"),
            ("dia_bp", "-1"),
            ("rr", "101"),
        ] {
            assert_eq!(
                reason(&format!(r#"{{"device_id":"a","ts":1,"{vital}":{value}}}"#)),
                format!("out_of_range:{vital}")
            );
        }
        for (vital, value) in [
            ("hr", "0"),
            ("hr", "300"),
            ("temp", "25"),
            ("temp", "45.0"),
            ("spo2", "100"),
        ] {
            assert!(parse(&format!(r#"{{"device_id":"a","ts":1,"{vital}":{value}}}"#)).is_ok());
        }
        assert_eq!(reason(r#"{"device_id":"a","ts":1}"#), "no_vitals");
        // The first bad vital in the fixed order is named.
        assert_eq!(
            reason(r#"{"device_id":"a","ts":1,"rr":"x","hr":"y"}"#),
            "bad_type:hr"
        );
    }

    #[test]
    fn last_duplicate_key_wins() {
        let s = parse(r#"{"device_id":"a","ts":1,"hr":80,"hr":81}"#).unwrap();
        assert_eq!(s.vitals.get(Vital::Hr), Some(81.0));
        assert_eq!(
            reason(r#"{"device_id":"a","ts":1,"hr":80,"hr":"81"}"#),
            "bad_type:hr"
        );
    }

    #[test]
    fn too_large_frames_are_refused_before_parsing() {
        let options = ParseOptions {
            max_frame_bytes: 16,
            require_ts: false,
        };
        let r = Parser::new(options, 0).parse(br#"{"device_id":"abc","hr":1}"#, None, 0);
        assert_eq!(r.unwrap_err(), RejectReason::TooLarge);
    }

    #[test]
    fn correlation_ids_are_taken_or_generated() {
        let s = parse(r#"{"device_id":"a","ts":1,"hr":1,"correlation_id":"req-42"}"#).unwrap();
        assert_eq!(s.correlation_id.to_string(), "req-42");
        let mut parser = Parser::new(ParseOptions::default(), 100);
        let a = parser
            .parse(br#"{"device_id":"a","ts":1,"hr":1}"#, None, 0)
            .unwrap();
        let _ = parser.parse(b"junk", None, 0);
        let b = parser
            .parse(
                br#"{"device_id":"a","ts":2,"hr":1,"correlation_id":5}"#,
                None,
                0,
            )
            .unwrap();
        assert_eq!(a.correlation_id, CorrelationId::Generated(100));
        assert_eq!(b.correlation_id, CorrelationId::Generated(101));
    }
}
