//! The local spool: where batches wait while PostgreSQL is unreachable.
//!
//! Append-only segment files `spool-<n>.log` in one directory. Each record is
//! `[length: u32 LE][crc32 of payload: u32 LE][payload]`, and is on disk (fsync) before
//! [`Spool::append`] returns, so a batch in the spool is as safe to acknowledge as one in the
//! database. Records are read back oldest first; a segment is deleted once every record in it
//! has been taken. The spool is bounded: [`Spool::append`] refuses a record that would take it
//! past `max_bytes`, and the writer then holds its input until there is room.
//!
//! On open, every record is checked. A record cut short by a crash (which was never
//! acknowledged) is cut off; any other damage is logged, counted, and the damaged bytes are
//! kept beside the segment as `*.corrupt` for a person to look at.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const HEADER: u64 = 8;
/// No single record is larger than this; a bigger length in a header means damage.
const MAX_RECORD: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({bytes} of {max} bytes used)")]
    Full { bytes: u64, max: u64 },
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
}

struct Segment {
    seq: u64,
    len: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; the last one is appended to.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// Offset of the next record to read in the oldest segment.
    read_offset: u64,
    records: u64,
    bytes: u64,
    /// Records found damaged when the spool was opened.
    pub corrupt_records: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, checking every record already there.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Spool> {
        fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("spool {}: {e}", dir.display())))?;
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("spool-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(1 << 20, 64 << 20),
            segments: VecDeque::new(),
            writer: None,
            read_offset: 0,
            records: 0,
            bytes: 0,
            corrupt_records: 0,
        };
        for seq in seqs {
            let (records, len) = spool.check_segment(seq)?;
            if records == 0 {
                fs::remove_file(spool.path(seq))?;
                continue;
            }
            spool.records += records;
            spool.bytes += len;
            spool.segments.push_back(Segment { seq, len });
        }
        if spool.records > 0 {
            tracing::warn!(
                records = spool.records,
                bytes = spool.bytes,
                dir = %dir.display(),
                "spool holds batches from an earlier run; they will be written when the database is reachable"
            );
        }
        Ok(spool)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("spool-{seq:020}.log"))
    }

    /// Counts the good records of a segment and cuts it after the last good one.
    fn check_segment(&mut self, seq: u64) -> io::Result<(u64, u64)> {
        let path = self.path(seq);
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        let mut reader = io::BufReader::new(&file);
        let (mut offset, mut records) = (0u64, 0u64);
        let mut payload = Vec::new();
        while offset < len {
            match read_record(&mut reader, len - offset, &mut payload) {
                Ok(n) => {
                    offset += n;
                    records += 1;
                }
                Err(damage) => {
                    let torn = damage.kind() == io::ErrorKind::UnexpectedEof;
                    if torn {
                        tracing::warn!(segment = %path.display(), offset, "spool record cut short by a crash; it was never acknowledged and is dropped");
                    } else {
                        self.corrupt_records += 1;
                        let kept = path.with_extension(format!("log.{offset}.corrupt"));
                        drop(reader);
                        file.seek(SeekFrom::Start(offset))?;
                        let mut rest = Vec::new();
                        file.read_to_end(&mut rest)?;
                        fs::write(&kept, rest)?;
                        tracing::error!(segment = %path.display(), offset, kept = %kept.display(), error = %damage,
                            "spool record damaged; the rest of the segment is kept aside and not replayed");
                    }
                    file.set_len(offset)?;
                    file.sync_all()?;
                    break;
                }
            }
        }
        Ok((records, offset))
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a record of `payload_len` bytes would fit now.
    pub fn has_room(&self, payload_len: usize) -> bool {
        self.bytes + HEADER + payload_len as u64 <= self.max_bytes
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        if !self.has_room(payload.len()) {
            return Err(SpoolError::Full {
                bytes: self.bytes,
                max: self.max_bytes,
            });
        }
        let rotate = self
            .segments
            .back()
            .is_none_or(|s| s.len >= self.segment_bytes)
            || self.writer.is_none();
        if rotate {
            let seq = self.segments.back().map_or(0, |s| s.seq + 1);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(seq))?;
            File::open(&self.dir)?.sync_all()?;
            if self.segments.back().is_none_or(|s| s.seq != seq) {
                self.segments.push_back(Segment { seq, len: 0 });
            }
            self.writer = Some(file);
        }
        let writer = self
            .writer
            .as_mut()
            .expect("a segment is open for appending");
        let mut record = Vec::with_capacity(HEADER as usize + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        writer.write_all(&record)?;
        writer.sync_data()?;
        let segment = self.segments.back_mut().expect("the segment just written");
        segment.len += record.len() as u64;
        self.bytes += record.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// The oldest record, without taking it.
    pub fn peek(&self) -> io::Result<Option<Vec<u8>>> {
        let Some(head) = self.segments.front() else {
            return Ok(None);
        };
        if self.read_offset >= head.len {
            return Ok(None);
        }
        let mut file = File::open(self.path(head.seq))?;
        file.seek(SeekFrom::Start(self.read_offset))?;
        let mut payload = Vec::new();
        read_record(
            &mut io::BufReader::new(file),
            head.len - self.read_offset,
            &mut payload,
        )?;
        Ok(Some(payload))
    }

    /// Takes the oldest record (after it has been written elsewhere); deletes its segment
    /// when it was the segment's last.
    pub fn pop(&mut self) -> io::Result<()> {
        let Some(head) = self.segments.front() else {
            return Ok(());
        };
        let mut header = [0u8; HEADER as usize];
        let mut file = File::open(self.path(head.seq))?;
        file.seek(SeekFrom::Start(self.read_offset))?;
        file.read_exact(&mut header)?;
        let len = HEADER + u64::from(u32::from_le_bytes(header[..4].try_into().expect("4 bytes")));
        self.read_offset += len;
        self.records -= 1;
        self.bytes -= len;
        if self.read_offset >= head.len {
            let seq = head.seq;
            self.segments.pop_front();
            self.read_offset = 0;
            if self.segments.is_empty() {
                self.writer = None;
            }
            fs::remove_file(self.path(seq))?;
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Reads one record into `payload`; returns its size on disk. `UnexpectedEof` means the
/// record runs past the end of the segment (cut short); `InvalidData` means damage.
fn read_record(reader: &mut impl Read, available: u64, payload: &mut Vec<u8>) -> io::Result<u64> {
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "record cut short");
    if available < HEADER {
        return Err(eof());
    }
    let mut header = [0u8; HEADER as usize];
    reader.read_exact(&mut header)?;
    let len = u64::from(u32::from_le_bytes(header[..4].try_into().expect("4 bytes")));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record length {len} is not plausible"),
        ));
    }
    if HEADER + len > available {
        return Err(eof());
    }
    payload.resize(len as usize, 0);
    reader.read_exact(payload)?;
    if crc32fast::hash(payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum mismatch",
        ));
    }
    Ok(HEADER + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(spool: &mut Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(r) = spool.peek().unwrap() {
            out.push(r);
            spool.pop().unwrap();
        }
        out
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Vec<u8>> = (0..300u32)
            .map(|i| vec![(i % 251) as u8; 10_000 + i as usize])
            .collect();
        {
            let mut spool = Spool::open(dir.path(), 8 << 20).unwrap();
            for r in &records {
                spool.append(r).unwrap();
            }
            assert_eq!(spool.records(), 300);
        }
        let segments = fs::read_dir(dir.path()).unwrap().count();
        assert!(
            segments > 1,
            "3 MB in 1 MiB segments should span several files"
        );
        let mut spool = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(spool.records(), 300);
        assert_eq!(drain(&mut spool), records);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "drained segments are deleted"
        );
        spool.append(b"after").unwrap();
        assert_eq!(drain(&mut spool), vec![b"after".to_vec()]);
    }

    #[test]
    fn a_full_spool_refuses_and_has_room_again_after_a_pop() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 100).unwrap();
        spool.append(&[1; 40]).unwrap();
        spool.append(&[2; 40]).unwrap();
        let err = spool.append(&[3; 40]).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    bytes: 96,
                    max: 100
                }
            ),
            "{err}"
        );
        spool.pop().unwrap();
        spool.append(&[3; 40]).unwrap();
        assert_eq!(drain(&mut spool), vec![vec![2; 40], vec![3; 40]]);
    }

    #[test]
    fn a_record_cut_short_by_a_crash_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(b"one").unwrap();
            spool.append(b"two").unwrap();
        }
        let path = dir.path().join(format!("spool-{:020}.log", 0));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(b"\0\0\0\0half").unwrap();
        drop(f);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.corrupt_records, 0);
        assert_eq!(drain(&mut spool), vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn a_damaged_record_is_counted_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
            for r in [b"one", b"two", b"six"] {
                spool.append(r).unwrap();
            }
        }
        let path = dir.path().join(format!("spool-{:020}.log", 0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[11 + 8] ^= 0xff; // a payload byte of the second record
        fs::write(&path, bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.corrupt_records, 1);
        assert_eq!(drain(&mut spool), vec![b"one".to_vec()]);
        let kept: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(kept.iter().any(|n| n.ends_with(".corrupt")), "{kept:?}");
    }
}
