//! Duplicate detection per device: a reading is a duplicate when a recent reading of the
//! same device had the same event time, or the same sequence number.
//!
//! Devices mostly send in order, so the common case is one comparison with the newest
//! reading seen; only out-of-order readings search the recent history.

use crate::model::Millis;
use std::collections::VecDeque;

/// How many recent readings per device are remembered (a minute at 1 Hz).
pub const HISTORY: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Dedup {
    recent: VecDeque<(Millis, Option<u64>)>,
    max_ts: Option<Millis>,
    max_seq: Option<u64>,
}

impl Dedup {
    /// Records the reading and tells whether it was seen before.
    pub fn is_duplicate(&mut self, ts: Millis, seq: Option<u64>) -> bool {
        let newer_ts = self.max_ts.is_none_or(|m| ts > m);
        let newer_seq = match (seq, self.max_seq) {
            (Some(s), Some(m)) => s > m,
            _ => true,
        };
        let seen = !(newer_ts && newer_seq)
            && self
                .recent
                .iter()
                .any(|&(t, s)| t == ts || (seq.is_some() && s == seq));
        if seen {
            return true;
        }
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back((ts, seq));
        self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
        if let Some(s) = seq {
            self.max_seq = Some(self.max_seq.map_or(s, |m| m.max(s)));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_ts_or_same_seq_is_a_duplicate() {
        let mut d = Dedup::default();
        assert!(!d.is_duplicate(1000, Some(1)));
        assert!(!d.is_duplicate(2000, Some(2)));
        assert!(d.is_duplicate(1000, Some(1)), "redelivery");
        assert!(d.is_duplicate(1000, None), "same ts");
        assert!(d.is_duplicate(1500, Some(2)), "same seq");
        assert!(!d.is_duplicate(1500, Some(3)), "out of order but new");
        assert!(!d.is_duplicate(1700, None), "no seq, new ts");
    }

    #[test]
    fn history_is_bounded() {
        let mut d = Dedup::default();
        for i in 0..1000 {
            assert!(!d.is_duplicate(i * 1000, Some(i as u64)));
        }
        assert_eq!(d.recent.len(), HISTORY);
        assert!(d.is_duplicate(999_000, Some(999)));
    }
}
