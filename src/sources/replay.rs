//! Replay: an NDJSON recording, one reading per line, from a file or stdin.
//!
//! The input is read in large blocks; each block is cut at its last newline and handed to
//! the engine whole, with the line boundaries, so no line is copied on the way in. A final
//! line without a newline counts too. Every line is a frame, blank ones included (they are
//! rejected as `invalid_json`), so the report's `lines` equals accepted plus rejected.

use super::SourceHandle;
use crate::model::now_micros;
use std::io::Read;

/// Lines per batch when replaying as fast as possible.
const FAST_BATCH_BYTES: usize = 1 << 20;
/// Smaller batches when paced, so readings are not held back waiting for the batch to fill.
const PACED_BATCH_BYTES: usize = 16 << 10;

/// A line longer than this is not buffered whole: its first bytes go to the engine (which
/// rejects them as `too_large`) and the rest is skipped, so memory stays bounded.
const MAX_LINE_BYTES: usize = 8 << 20;

/// What a replay read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayStats {
    pub lines: u64,
    pub bytes: u64,
}

/// Reads `input` to the end and feeds every line to the engine. Returns when the input ends,
/// the engine stops, or a read fails.
pub fn run(
    mut input: impl Read,
    mut handle: SourceHandle,
    paced: bool,
) -> std::io::Result<ReplayStats> {
    let block = if paced {
        PACED_BATCH_BYTES
    } else {
        FAST_BATCH_BYTES
    };
    let mut stats = ReplayStats::default();
    // Bytes after the last newline of the previous block.
    let mut carry: Vec<u8> = Vec::new();
    // Skipping the rest of an overlong line.
    let mut skipping = false;
    loop {
        let mut data = std::mem::take(&mut carry);
        data.reserve(block);
        // `read_to_end` on a `take` fills the spare capacity without zeroing it first.
        let n = input.by_ref().take(block as u64).read_to_end(&mut data)?;
        let eof = n == 0;
        if eof && data.is_empty() {
            break;
        }
        if skipping {
            match memchr::memchr(b'\n', &data) {
                Some(i) => {
                    data.drain(..=i);
                    skipping = false;
                }
                None if eof => break,
                None => continue,
            }
        }
        // Cut at the last newline; the tail waits for the next block (or is the last line).
        let cut = if eof {
            data.len()
        } else {
            match memchr::memrchr(b'\n', &data) {
                Some(i) => i + 1,
                // A line longer than a block: keep reading until it ends.
                None if data.len() < MAX_LINE_BYTES => {
                    carry = data;
                    continue;
                }
                None => {
                    skipping = true;
                    data.len()
                }
            }
        };
        carry.extend_from_slice(&data[cut..]);
        data.truncate(cut);
        stats.bytes += data.len() as u64;
        let mut batch = handle.batch();
        let received_us = now_micros();
        let mut line_start = 0usize;
        for i in memchr::memchr_iter(b'\n', &data) {
            batch.frames.push(frame(line_start, i, received_us));
            line_start = i + 1;
        }
        if line_start < data.len() {
            batch
                .frames
                .push(frame(line_start, data.len(), received_us));
        }
        stats.lines += batch.frames.len() as u64;
        batch.data = data;
        if !handle.send(batch) {
            break;
        }
        if eof {
            break;
        }
    }
    Ok(stats)
}

fn frame(start: usize, end: usize, received_us: i64) -> crate::model::FrameMeta {
    crate::model::FrameMeta {
        origin: None,
        warmup: false,
        start: start as u32,
        end: end as u32,
        received_us,
        device_hint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClockMode, FrameBatch};

    fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
        let (tx, rx) = crossbeam_channel::unbounded::<FrameBatch>();
        let handle = SourceHandle {
            id: 0,
            mode: ClockMode::Replay { speed: 0.0 },
            next_seq: 0,
            tx,
            ids: Default::default(),
            names: None,
            presence: false,
        };
        let stats = run(input, handle, false).unwrap();
        let lines: Vec<Vec<u8>> = rx
            .try_iter()
            .flat_map(|b| {
                b.frames
                    .iter()
                    .map(|f| b.payload(f).to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(stats.lines as usize, lines.len());
        lines
    }

    #[test]
    fn every_line_is_a_frame() {
        assert_eq!(lines_of(b"a\nb\n"), [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(lines_of(b"a\n\nb"), [b"a".to_vec(), vec![], b"b".to_vec()]);
        assert!(lines_of(b"").is_empty());
        assert_eq!(lines_of(b"\n"), [Vec::<u8>::new()]);
    }

    #[test]
    fn overlong_lines_are_cut_and_skipped() {
        let mut input = vec![b'x'; MAX_LINE_BYTES + FAST_BATCH_BYTES * 3];
        input.extend_from_slice(b"\nnext\n");
        let lines = lines_of(&input);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].len() >= MAX_LINE_BYTES && lines[0].len() < input.len());
        assert_eq!(lines[1], b"next");
    }

    #[test]
    fn lines_longer_than_a_block_survive() {
        let long = vec![b'x'; FAST_BATCH_BYTES * 2 + 17];
        let mut input = long.clone();
        input.extend_from_slice(b"\nshort\n");
        assert_eq!(lines_of(&input), [long, b"short".to_vec()]);
    }
}
