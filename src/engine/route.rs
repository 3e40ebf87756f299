//! The router: puts parsed batches back in source order, runs each source's clock
//! (future-time check, watermark, lateness, replay pacing), and sends every reading to the
//! shard that owns its device.

use super::shard::ShardMsg;
use super::{ParsedBatch, RejectBatch, dead_letter};
use crate::ack::Ack;
use crate::engine::EngineConfig;
use crate::metrics::Metrics;
use crate::model::{ClockMode, Id, Millis, RejectReason, Rejected, Sample, SourceId, now_millis};
use crate::sources::DeviceContext;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// How often shards hear the time when no data flows (idle windows, state eviction).
const TICK: Duration = Duration::from_millis(500);

/// A replay's clock starts from the median event time of its first this many readings, so
/// one line with a wrong clock at the start cannot drag it (see [`SourceClock::anchor`]).
const ANCHOR_READINGS: usize = 64;

/// A replay holds its first batches at most this long to find its clock (input trickling
/// in from stdin).
const ANCHOR_WAIT: Duration = Duration::from_secs(1);

/// What a source's clock says about a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Too far ahead of the source's clock: rejected as `future_ts`.
    Future,
    /// Further behind the source's clock than `max_age`: rejected as `too_old`.
    TooOld,
    /// Accepted; `late` when it arrived behind the source's watermark.
    Accepted { late: bool },
}

/// One source's ordering and clock.
struct SourceClock {
    next_seq: u64,
    pending: BTreeMap<u64, ParsedBatch>,
    /// Latest event time accepted.
    max_ts: Option<Millis>,
    /// A replay's starting clock: the median event time of its first readings (never beyond
    /// the wall clock). Until it is known, the replay's first batches are held.
    anchor: Option<Millis>,
    /// Batches held while the anchor is found, in order.
    held: Vec<ParsedBatch>,
    held_since: Option<Instant>,
    last_batch: Instant,
    /// Replay pacing: (first event time, wall instant it was replayed at).
    pace_origin: Option<(Millis, Instant)>,
}

impl SourceClock {
    fn new() -> Self {
        SourceClock {
            next_seq: 0,
            pending: BTreeMap::new(),
            max_ts: None,
            anchor: None,
            held: Vec::new(),
            held_since: None,
            last_batch: Instant::now(),
            pace_origin: None,
        }
    }

    /// Judges one reading at event time `ts`, in source order, and advances the clock.
    /// A live source's clock is the receive time; a replay's is the newest event time
    /// accepted so far, starting from its anchor. Neither may run past the wall clock plus
    /// `skew`; a reading more than `max_age` behind the clock is too old.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        ts: Millis,
        mode: ClockMode,
        received_ms: Millis,
        wall: Millis,
        skew: Millis,
        lateness: Millis,
        max_age: Millis,
    ) -> Verdict {
        // Future: ahead of a live source's receive time, or of a replay's clock (its newest
        // event time, from its anchor), by more than `skew`; never beyond the wall clock.
        // Too old: behind the receive time, or the replay's anchor, by more than max_age.
        let (floor, limit) = match mode {
            ClockMode::Live => (Some(received_ms), received_ms.max(wall) + skew),
            ClockMode::Replay { .. } => {
                let anchor = self.anchor.map(|a| a.min(wall));
                let clock = self.max_ts.max(anchor).map(|c| c.min(wall));
                (anchor, clock.map_or(wall, |c| c) + skew)
            }
        };
        if ts > limit {
            return Verdict::Future;
        }
        if floor.is_some_and(|floor| ts < floor.saturating_sub(max_age)) {
            return Verdict::TooOld;
        }
        let late = self.max_ts.is_some_and(|max| ts < max - lateness);
        self.max_ts = Some(self.max_ts.map_or(ts, |max| max.max(ts)));
        Verdict::Accepted { late }
    }
}

pub(super) struct Router {
    shards: Vec<Sender<ShardMsg>>,
    rejects: Option<Sender<RejectBatch>>,
    metrics: Arc<Metrics>,
    lateness: Millis,
    skew: Millis,
    idle: Duration,
    sources: HashMap<SourceId, SourceClock>,
    max_age: Millis,
    /// The device registry: accepted readings of a source that tracks presence mark their
    /// device as heard.
    presence: DeviceContext,
    /// Outgoing batches, one per shard, reused.
    out: Vec<Vec<Sample>>,
}

/// The shard that owns a device: a stable hash of its id.
pub fn shard_of(device_id: &str, shards: usize) -> usize {
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    h.write(device_id.as_bytes());
    (h.finish() % shards as u64) as usize
}

impl Router {
    pub(super) fn new(
        config: &EngineConfig,
        shards: Vec<Sender<ShardMsg>>,
        rejects: Option<Sender<RejectBatch>>,
        metrics: Arc<Metrics>,
        presence: DeviceContext,
    ) -> Router {
        let n = shards.len();
        Router {
            shards,
            rejects,
            metrics,
            lateness: config.allowed_lateness.as_millis() as Millis,
            skew: config.max_clock_skew.as_millis() as Millis,
            idle: config.idle_timeout,
            max_age: config.max_age.as_millis() as Millis,
            presence,
            sources: HashMap::new(),
            out: (0..n).map(|_| Vec::new()).collect(),
        }
    }

    pub(super) fn run(mut self, input: Receiver<ParsedBatch>) {
        let mut last_tick = Instant::now();
        loop {
            match input.recv_timeout(TICK) {
                Ok(batch) => {
                    let source = batch.source;
                    let clock = self.sources.entry(source).or_insert_with(SourceClock::new);
                    clock.pending.insert(batch.seq, batch);
                    while let Some(batch) = self.next_in_order(source) {
                        let last = batch.raw.last;
                        if !self.take(batch) {
                            return;
                        }
                        if last {
                            self.sources.remove(&source);
                            break;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every source has ended: what replays still hold goes on.
                    let holding: Vec<SourceId> = (self.sources.iter())
                        .filter(|(_, c)| !c.held.is_empty())
                        .map(|(&id, _)| id)
                        .collect();
                    if !holding.into_iter().all(|source| self.release(source)) {
                        return;
                    }
                    break;
                }
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                if !self.release_overdue() {
                    return;
                }
                let (now_ms, watermark) = (now_millis(), self.watermark());
                let tick = || ShardMsg::Tick { now_ms, watermark };
                if self.shards.iter().any(|s| s.send(tick()).is_err()) {
                    return;
                }
            }
        }
        // End of input: the shards close every window when their queues disconnect.
        let leftovers: usize = self.sources.values().map(|c| c.pending.len()).sum();
        if leftovers > 0 {
            tracing::error!(
                leftovers,
                "batches missing from a source's sequence at shutdown"
            );
        }
    }

    fn next_in_order(&mut self, source: SourceId) -> Option<ParsedBatch> {
        let clock = self.sources.get_mut(&source)?;
        let batch = clock.pending.remove(&clock.next_seq)?;
        clock.next_seq += 1;
        clock.last_batch = Instant::now();
        Some(batch)
    }

    /// Takes the next batch of a source, in order. A replay's first batches are held until
    /// its first [`ANCHOR_READINGS`] readings (or its end, or [`ANCHOR_WAIT`]) set its clock.
    fn take(&mut self, batch: ParsedBatch) -> bool {
        let source = batch.source;
        let clock = self.sources.get_mut(&source).expect("source clock exists");
        if !matches!(batch.mode, ClockMode::Replay { .. }) || clock.anchor.is_some() {
            return self.route(batch);
        }
        let last = batch.raw.last;
        clock.held_since.get_or_insert_with(Instant::now);
        clock.held.push(batch);
        let readings: usize = clock.held.iter().map(|b| b.samples.len()).sum();
        if readings >= ANCHOR_READINGS || last {
            return self.release(source);
        }
        true
    }

    /// Sets a replay's anchor from the readings it holds and routes them.
    fn release(&mut self, source: SourceId) -> bool {
        let Some(clock) = self.sources.get_mut(&source) else {
            return true;
        };
        let mut times: Vec<Millis> = (clock.held.iter())
            .flat_map(|b| b.samples.iter().map(|s| s.ts))
            .take(ANCHOR_READINGS)
            .collect();
        if !times.is_empty() {
            let middle = times.len() / 2;
            let anchor = *times.select_nth_unstable(middle).1;
            clock.anchor = Some(anchor);
            // A paced replay keeps time from its earliest reading near the anchor, not from
            // whatever line came first.
            let start = (times.iter().copied())
                .filter(|&t| t >= anchor.saturating_sub(self.skew))
                .min()
                .unwrap_or(anchor);
            clock.pace_origin.get_or_insert((start, Instant::now()));
        }
        clock.held_since = None;
        let held = std::mem::take(&mut clock.held);
        held.into_iter().all(|batch| self.route(batch))
    }

    /// Releases replays whose first batches have waited [`ANCHOR_WAIT`].
    fn release_overdue(&mut self) -> bool {
        let overdue: Vec<SourceId> = (self.sources.iter())
            .filter(|(_, c)| c.held_since.is_some_and(|t| t.elapsed() >= ANCHOR_WAIT))
            .map(|(&id, _)| id)
            .collect();
        overdue.into_iter().all(|source| self.release(source))
    }

    /// The engine's watermark: the slowest source that is still sending decides.
    fn watermark(&self) -> Millis {
        let of = |c: &SourceClock| c.max_ts.map_or(Millis::MIN, |m| m - self.lateness);
        let active = self
            .sources
            .values()
            .filter(|c| c.last_batch.elapsed() < self.idle)
            .map(of)
            .min();
        active
            .or_else(|| self.sources.values().map(of).max())
            .unwrap_or(Millis::MIN)
    }

    /// Routes one batch; false when the shards are gone.
    fn route(&mut self, mut batch: ParsedBatch) -> bool {
        let wall = now_millis();
        let shards = self.shards.len();
        let clock = self
            .sources
            .get_mut(&batch.source)
            .expect("source clock exists");
        let mut rejected = Vec::new();
        let (mut future, mut too_old) = (0u64, 0u64);
        let mut accepted = 0u64;
        for (mut sample, frame) in batch.samples.drain(..).zip(&batch.sample_frames) {
            let received_ms = sample.received_us.div_euclid(1000);
            match clock.admit(
                sample.ts,
                batch.mode,
                received_ms,
                wall,
                self.skew,
                self.lateness,
                self.max_age,
            ) {
                // A warm-up reading was judged by the node that owned it: not again.
                Verdict::Future | Verdict::TooOld if sample.warmup => continue,
                verdict @ (Verdict::Future | Verdict::TooOld) => {
                    let reason = if verdict == Verdict::Future {
                        future += 1;
                        RejectReason::FutureTs
                    } else {
                        too_old += 1;
                        RejectReason::TooOld
                    };
                    let frame = &batch.raw.frames[*frame as usize];
                    rejected.push(Rejected {
                        source: batch.source,
                        reason,
                        received_us: frame.received_us,
                        payload: batch.raw.payload(frame).to_vec(),
                        origin: frame.origin.clone(),
                    });
                    continue;
                }
                // A reading read again to rebuild state is older than the source's clock by
                // design; it still belongs in its windows.
                Verdict::Accepted { late } => sample.late = late && !sample.warmup,
            }
            if let ClockMode::Replay { speed } = batch.mode
                && speed > 0.0
            {
                pace(&mut clock.pace_origin, sample.ts, speed, self.skew);
            }
            // A warm-up reading was accepted once already, by the node that owned it.
            accepted += u64::from(!sample.warmup);
            if batch.raw.presence && !sample.warmup {
                self.presence.heard(&sample.device_id, received_ms);
            }
            let shard = if shards == 1 {
                0
            } else {
                shard_of(&sample.device_id, shards)
            };
            self.out[shard].push(sample);
        }
        self.metrics.accepted.fetch_add(accepted, Relaxed);
        self.metrics.reject(RejectReason::FutureTs, future);
        self.metrics.reject(RejectReason::TooOld, too_old);
        dead_letter(&self.rejects, rejected, &batch.ack);
        let watermark = self.watermark();
        let now_ms = now_millis();
        let forget: Arc<[Id]> = std::mem::take(&mut batch.raw.forget).into();
        for (shard, tx) in self.shards.iter().enumerate() {
            let samples = std::mem::take(&mut self.out[shard]);
            if tx
                .send(ShardMsg::Batch {
                    samples,
                    forget: forget.clone(),
                    watermark,
                    now_ms,
                    ack: batch.ack.as_ref().map(Ack::share),
                })
                .is_err()
            {
                return false;
            }
        }
        if let Some(ack) = batch.ack.take() {
            ack.done();
        }
        true
    }
}

/// Sleeps until event time `ts` is due at `speed` × real time. A jump ahead in event time of
/// more than `gap` (a recording's pause, or one wrong clock) is not slept through: the
/// replay carries on from there.
fn pace(origin: &mut Option<(Millis, Instant)>, ts: Millis, speed: f64, gap: Millis) {
    let (t0, start) = *origin.get_or_insert((ts, Instant::now()));
    let ahead = (ts - t0) as f64 - start.elapsed().as_secs_f64() * 1000.0 * speed;
    if ahead > gap as f64 {
        *origin = Some((ts, Instant::now()));
        return;
    }
    let due = Duration::from_secs_f64(((ts - t0).max(0) as f64 / 1000.0) / speed);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_767_225_600_000;
    const REPLAY: ClockMode = ClockMode::Replay { speed: 0.0 };

    const WEEK: Millis = 7 * 86_400_000;

    fn admit(clock: &mut SourceClock, mode: ClockMode, ts: Millis, wall: Millis) -> Verdict {
        clock.admit(ts, mode, wall, wall, 300_000, 5_000, WEEK)
    }

    #[test]
    fn readings_older_than_max_age_are_too_old() {
        let now = T0;
        let mut c = SourceClock::new();
        assert_eq!(
            admit(&mut c, ClockMode::Live, 0, now),
            Verdict::TooOld,
            "1970"
        );
        assert_eq!(
            admit(&mut c, ClockMode::Live, now - WEEK - 1, now),
            Verdict::TooOld
        );
        assert_eq!(
            admit(&mut c, ClockMode::Live, now - WEEK, now),
            Verdict::Accepted { late: false },
            "exactly max_age old"
        );
        // A replay judges age against its own clock, so an old recording replays.
        let mut r = SourceClock::new();
        r.anchor = Some(T0 - 10 * WEEK);
        let wall = T0;
        assert_eq!(
            admit(&mut r, REPLAY, T0 - 10 * WEEK, wall),
            Verdict::Accepted { late: false }
        );
        assert_eq!(admit(&mut r, REPLAY, 1, wall), Verdict::TooOld);
        assert_eq!(
            admit(&mut r, REPLAY, T0 - 10 * WEEK + 1_000, wall),
            Verdict::Accepted { late: false }
        );
    }

    #[test]
    fn lateness_is_measured_against_the_newest_event_time() {
        let mut c = SourceClock::new();
        let wall = T0 + 86_400_000;
        assert_eq!(
            admit(&mut c, REPLAY, T0 + 10_000, wall),
            Verdict::Accepted { late: false }
        );
        assert_eq!(
            admit(&mut c, REPLAY, T0 + 5_000, wall),
            Verdict::Accepted { late: false },
            "exactly at the watermark"
        );
        assert_eq!(
            admit(&mut c, REPLAY, T0 + 4_999, wall),
            Verdict::Accepted { late: true }
        );
        // A late reading does not move the clock back.
        assert_eq!(c.max_ts, Some(T0 + 10_000));
    }

    #[test]
    fn a_replay_rejects_readings_far_ahead_of_its_own_clock() {
        let mut c = SourceClock::new();
        let wall = T0 + 86_400_000;
        assert_eq!(
            admit(&mut c, REPLAY, T0, wall),
            Verdict::Accepted { late: false }
        );
        assert_eq!(admit(&mut c, REPLAY, T0 + 300_001, wall), Verdict::Future);
        assert_eq!(
            admit(&mut c, REPLAY, T0 + 300_000, wall),
            Verdict::Accepted { late: false }
        );
        // Never beyond the wall clock, even for the first reading.
        let mut fresh = SourceClock::new();
        assert_eq!(
            admit(&mut fresh, REPLAY, wall + 300_001, wall),
            Verdict::Future
        );
    }

    #[test]
    fn a_live_source_is_judged_by_its_receive_time() {
        let mut c = SourceClock::new();
        let now = T0;
        assert_eq!(
            admit(&mut c, ClockMode::Live, now + 300_000, now),
            Verdict::Accepted { late: false }
        );
        assert_eq!(
            admit(&mut c, ClockMode::Live, now + 300_001, now),
            Verdict::Future
        );
        // The future reading did not move the watermark: an on-time reading is not late.
        assert_eq!(
            admit(&mut c, ClockMode::Live, now + 295_000, now),
            Verdict::Accepted { late: false }
        );
    }

    #[test]
    fn shard_of_is_stable_and_spreads() {
        assert_eq!(shard_of("bed-1", 4), shard_of("bed-1", 4));
        let mut seen = [0; 4];
        for i in 0..1000 {
            seen[shard_of(&format!("bed-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }
}
