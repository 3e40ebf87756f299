//! The values that flow through the engine: raw frames in, samples through, alerts out.

use compact_str::CompactString;
use serde::Serialize;
use std::sync::Arc;

/// A validated identifier (device or patient): `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`.
/// Short ids (up to 24 bytes) live inline, so most readings allocate nothing for them.
pub type Id = CompactString;

/// Milliseconds since the Unix epoch (event time or wall-clock time).
pub type Millis = i64;

/// Wall-clock time in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    now_micros() / 1000
}

/// The six vital signs a reading may carry, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vital {
    Hr,
    Spo2,
    Temp,
    SysBp,
    DiaBp,
    Rr,
}

impl Vital {
    pub const ALL: [Vital; 6] = [
        Vital::Hr,
        Vital::Spo2,
        Vital::Temp,
        Vital::SysBp,
        Vital::DiaBp,
        Vital::Rr,
    ];

    /// The JSON key and rule-language name of this vital.
    pub const fn name(self) -> &'static str {
        match self {
            Vital::Hr => "hr",
            Vital::Spo2 => "spo2",
            Vital::Temp => "temp",
            Vital::SysBp => "sys_bp",
            Vital::DiaBp => "dia_bp",
            Vital::Rr => "rr",
        }
    }

    /// The accepted physical range, inclusive (°C for temperature, mmHg for pressure).
    pub const fn range(self) -> (f64, f64) {
        match self {
            Vital::Hr => (0.0, 300.0),
            Vital::Spo2 => (0.0, 100.0),
            Vital::Temp => (25.0, 45.0),
            Vital::SysBp | Vital::DiaBp => (0.0, 300.0),
            Vital::Rr => (0.0, 100.0),
        }
    }

    pub fn from_name(name: &str) -> Option<Vital> {
        Vital::ALL.into_iter().find(|v| v.name() == name)
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The vitals of one reading; `NaN` marks an absent value (JSON has no NaN, so it is free).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vitals(pub [f64; 6]);

impl Default for Vitals {
    fn default() -> Self {
        Vitals([f64::NAN; 6])
    }
}

impl Vitals {
    pub fn get(&self, vital: Vital) -> Option<f64> {
        let v = self.0[vital.index()];
        (!v.is_nan()).then_some(v)
    }

    pub fn set(&mut self, vital: Vital, value: f64) {
        self.0[vital.index()] = value;
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|v| v.is_nan())
    }
}

/// Where a batch of frames came from; one watermark is kept per source.
pub type SourceId = u16;

/// How a source's clock runs, which decides what "in the future" means for its readings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ClockMode {
    /// Devices sending now: the clock is the receive time.
    #[default]
    Live,
    /// A recording: the clock is the latest event time accepted so far (and never beyond the
    /// wall clock). `speed` > 0 paces the replay at that multiple of event time.
    Replay { speed: f64 },
}

/// A batch of raw payloads from one source, stored back to back in one buffer.
/// Sources only read and stamp time; they never parse.
#[derive(Debug, Default)]
pub struct FrameBatch {
    pub source: SourceId,
    pub mode: ClockMode,
    /// Order of this batch within its source, stamped by the source handle.
    pub seq: u64,
    /// Runs once every frame of the batch is durable (or dead-lettered).
    pub ack: Option<crate::ack::Ack>,
    /// Payload bytes, one frame after another.
    pub data: Vec<u8>,
    pub frames: Vec<FrameMeta>,
    /// Devices whose state the engine drops before this batch's frames: another node owns
    /// them now (their Kafka partition moved).
    pub forget: Vec<Id>,
    /// The source ends with this batch (a Kafka partition left): its clock no longer holds
    /// the watermark back.
    pub last: bool,
    /// The source speaks for devices present now (MQTT): each accepted reading marks its
    /// device as heard in the device registry.
    pub presence: bool,
}

/// One frame inside a [`FrameBatch`].
#[derive(Debug, Clone)]
pub struct FrameMeta {
    /// Byte range of the payload in [`FrameBatch::data`].
    pub start: u32,
    pub end: u32,
    /// Wall-clock receive time, microseconds since the epoch.
    pub received_us: i64,
    /// Device id given by the transport (an MQTT topic segment), if any.
    pub device_hint: Option<Id>,
    /// Where the transport keeps it (a Kafka record), for dead letters.
    pub origin: Option<Origin>,
    /// Read again to rebuild state, not new (see [`Sample::warmup`]).
    pub warmup: bool,
}

/// A Kafka record's place: topic, partition, offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl FrameBatch {
    pub fn new(source: SourceId, mode: ClockMode) -> Self {
        FrameBatch {
            source,
            mode,
            seq: 0,
            ack: None,
            data: Vec::new(),
            frames: Vec::new(),
            forget: Vec::new(),
            last: false,
            presence: false,
        }
    }

    /// Appends one payload.
    pub fn push(&mut self, payload: &[u8], received_us: i64, device_hint: Option<Id>) {
        let start = self.data.len() as u32;
        self.data.extend_from_slice(payload);
        self.frames.push(FrameMeta {
            start,
            end: self.data.len() as u32,
            received_us,
            device_hint,
            origin: None,
            warmup: false,
        });
    }

    /// Appends a Kafka record: its place, and whether it is read again only to rebuild state.
    pub fn push_record(
        &mut self,
        payload: &[u8],
        received_us: i64,
        device_hint: Option<Id>,
        origin: Origin,
        warmup: bool,
    ) {
        self.push(payload, received_us, device_hint);
        let frame = self.frames.last_mut().expect("just pushed");
        frame.origin = Some(origin);
        frame.warmup = warmup;
    }

    pub fn payload(&self, frame: &FrameMeta) -> &[u8] {
        &self.data[frame.start as usize..frame.end as usize]
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Identifies the reading that caused something, through every output and log line.
/// Taken from the payload's `correlation_id` when it carries a valid one, else generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorrelationId {
    Given(Id),
    Generated(u64),
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorrelationId::Given(id) => f.write_str(id),
            CorrelationId::Generated(n) => write!(f, "vs-{n:016x}"),
        }
    }
}

impl Serialize for CorrelationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One accepted reading.
#[derive(Debug, Clone)]
pub struct Sample {
    pub device_id: Id,
    /// From the payload; when absent the device's assignment is used.
    pub patient_id: Option<Id>,
    /// Event time: the device's `ts`, else the receive time.
    pub ts: Millis,
    /// Whether `ts` came from the device (not the receive time).
    pub device_ts: bool,
    /// Wall-clock receive time, microseconds since the epoch.
    pub received_us: i64,
    pub vitals: Vitals,
    pub seq: Option<u64>,
    pub correlation_id: CorrelationId,
    /// Set by the router when the reading arrived behind its source's watermark.
    pub late: bool,
    /// Read again only to rebuild state (a Kafka partition that moved to this node): it
    /// fills windows but raises nothing and is not stored again.
    pub warmup: bool,
}

/// Why a frame was rejected. The names are stable: they appear in counters,
/// reports and dead-letter records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    InvalidJson,
    NotObject,
    MissingDeviceId,
    BadDeviceId,
    DeviceIdMismatch,
    BadPatientId,
    MissingTs,
    BadTs,
    FutureTs,
    /// Older than `engine.max_age` behind its source's clock.
    TooOld,
    BadSeq,
    BadType(Vital),
    OutOfRange(Vital),
    NoVitals,
    TooLarge,
    /// A device's technical alert message that does not follow its contract.
    BadDeviceAlert,
    /// A device status message that is neither online nor offline.
    BadStatus,
}

impl RejectReason {
    /// Every reason, for counters indexed by [`RejectReason::index`].
    pub fn all() -> Vec<RejectReason> {
        let mut all = vec![
            RejectReason::InvalidJson,
            RejectReason::NotObject,
            RejectReason::MissingDeviceId,
            RejectReason::BadDeviceId,
            RejectReason::DeviceIdMismatch,
            RejectReason::BadPatientId,
            RejectReason::MissingTs,
            RejectReason::BadTs,
            RejectReason::FutureTs,
            RejectReason::BadSeq,
            RejectReason::NoVitals,
            RejectReason::TooLarge,
            RejectReason::BadDeviceAlert,
            RejectReason::BadStatus,
            RejectReason::TooOld,
        ];
        all.extend(Vital::ALL.map(RejectReason::BadType));
        all.extend(Vital::ALL.map(RejectReason::OutOfRange));
        all
    }

    pub const COUNT: usize = 15 + 12;

    /// A dense index for counter arrays.
    pub fn index(self) -> usize {
        match self {
            RejectReason::InvalidJson => 0,
            RejectReason::NotObject => 1,
            RejectReason::MissingDeviceId => 2,
            RejectReason::BadDeviceId => 3,
            RejectReason::DeviceIdMismatch => 4,
            RejectReason::BadPatientId => 5,
            RejectReason::MissingTs => 6,
            RejectReason::BadTs => 7,
            RejectReason::FutureTs => 8,
            RejectReason::BadSeq => 9,
            RejectReason::NoVitals => 10,
            RejectReason::TooLarge => 11,
            RejectReason::BadDeviceAlert => 12,
            RejectReason::BadStatus => 13,
            RejectReason::TooOld => 14,
            RejectReason::BadType(v) => 15 + v.index(),
            RejectReason::OutOfRange(v) => 21 + v.index(),
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotObject => "not_object",
            RejectReason::MissingDeviceId => "missing_device_id",
            RejectReason::BadDeviceId => "bad_device_id",
            RejectReason::DeviceIdMismatch => "device_id_mismatch",
            RejectReason::BadPatientId => "bad_patient_id",
            RejectReason::MissingTs => "missing_ts",
            RejectReason::BadTs => "bad_ts",
            RejectReason::FutureTs => "future_ts",
            RejectReason::TooOld => "too_old",
            RejectReason::BadSeq => "bad_seq",
            RejectReason::NoVitals => "no_vitals",
            RejectReason::TooLarge => "too_large",
            RejectReason::BadDeviceAlert => "bad_device_alert",
            RejectReason::BadStatus => "bad_status",
            RejectReason::BadType(v) => return write!(f, "bad_type:{}", v.name()),
            RejectReason::OutOfRange(v) => return write!(f, "out_of_range:{}", v.name()),
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reject_reason_has_its_own_counter() {
        let mut seen = [false; RejectReason::COUNT];
        for reason in RejectReason::all() {
            assert!(!seen[reason.index()], "{reason} shares a counter");
            seen[reason.index()] = true;
        }
        assert!(seen.iter().all(|&s| s), "COUNT matches the reasons");
    }
}

/// A frame that failed validation, kept with its original bytes for the dead-letter output.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub source: SourceId,
    pub reason: RejectReason,
    pub received_us: i64,
    pub payload: Vec<u8>,
    /// The Kafka record it came in, if it did.
    pub origin: Option<Origin>,
}
