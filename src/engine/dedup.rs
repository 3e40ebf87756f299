//! Duplicate detection per device: a reading is a duplicate when a recent reading of the
//! same device had the same event time, or the same sequence number.
//!
//! Devices mostly send in order, so the common case is one comparison with the newest
//! reading seen; only out-of-order readings search the recent history.

use crate::model::Millis;

/// How many recent readings per device are remembered (half a minute at 1 Hz). Kept inline,
/// so checking a reading touches the device's own memory only.
pub const HISTORY: usize = 32;

/// `repr(C)`: the small fields come first, so the ring's bulk does not push them apart.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Dedup {
    max_ts: Option<Millis>,
    max_seq: Option<u64>,
    len: usize,
    next: usize,
    /// A ring of (event time, sequence number); `len` entries are filled.
    recent: [(Option<Millis>, Option<u64>); HISTORY],
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            recent: [(None, None); HISTORY],
            len: 0,
            next: 0,
            max_ts: None,
            max_seq: None,
        }
    }
}

impl Dedup {
    /// Starts loading the history slot the next reading writes.
    pub fn prefetch(&self) {
        super::shard::prefetch(&self.recent[self.next]);
    }

    /// Records the reading and tells whether it was seen before. `ts` is the device's own
    /// event time: a receive time says nothing about redelivery (two readings can arrive in
    /// the same millisecond), so readings without a device `ts` are matched by `seq` only.
    pub fn is_duplicate(&mut self, ts: Option<Millis>, seq: Option<u64>) -> bool {
        if ts.is_none() && seq.is_none() {
            return false;
        }
        let newer_ts = match ts {
            Some(t) => self.max_ts.is_none_or(|m| t > m),
            None => true,
        };
        let newer_seq = match (seq, self.max_seq) {
            (Some(s), Some(m)) => s > m,
            _ => true,
        };
        let seen = !(newer_ts && newer_seq)
            && self.recent[..self.len]
                .iter()
                .any(|&(t, s)| (ts.is_some() && t == ts) || (seq.is_some() && s == seq));
        if seen {
            return true;
        }
        self.recent[self.next] = (ts, seq);
        self.next = (self.next + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
        if let Some(t) = ts {
            self.max_ts = Some(self.max_ts.map_or(t, |m| m.max(t)));
        }
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
        assert!(!d.is_duplicate(Some(1000), Some(1)));
        assert!(!d.is_duplicate(Some(2000), Some(2)));
        assert!(d.is_duplicate(Some(1000), Some(1)), "redelivery");
        assert!(d.is_duplicate(Some(1000), None), "same ts");
        assert!(d.is_duplicate(Some(1500), Some(2)), "same seq");
        assert!(!d.is_duplicate(Some(1500), Some(3)), "out of order but new");
        assert!(!d.is_duplicate(Some(1700), None), "no seq, new ts");
    }

    #[test]
    fn without_a_device_ts_only_seq_recognises_a_redelivery() {
        let mut d = Dedup::default();
        assert!(!d.is_duplicate(None, None));
        assert!(!d.is_duplicate(None, None), "nothing to recognise it by");
        assert!(!d.is_duplicate(None, Some(7)));
        assert!(d.is_duplicate(None, Some(7)));
        assert!(!d.is_duplicate(None, Some(8)));
    }

    #[test]
    fn history_is_bounded() {
        let mut d = Dedup::default();
        for i in 0..1000 {
            assert!(!d.is_duplicate(Some(i * 1000), Some(i as u64)));
        }
        assert_eq!(d.len, HISTORY);
        assert!(d.is_duplicate(Some(999_000), Some(999)));
    }
}
