//! Batch-shaped rows: the queue keeps readings in `chunks`, one row per run of one device's
//! readings with consecutive ids, so a commit writes a row and an index entry per device
//! rather than per reading.
//!
//! A commit gives its readings ids device by device (a device's readings keep their order),
//! so each device's readings of the commit form one id range; runs longer than
//! [`MAX_CHUNK`] are cut. A row is keyed by its last id and holds its first, and its body
//! holds the readings in id order. Every operation that takes readings out (an ack's id
//! range, a device's oldest for eviction, one reading for quarantine) deletes the rows it
//! covers whole and rewrites at most the rows at its edges with the readings that stay, so
//! each is exact to the reading.
//!
//! # Body
//! Per reading, in id order: varint `series << 1 | has_seq`, varint zigzag of the time minus
//! the previous reading's (the first's minus 0, wrapping), the value's 8 bits little-endian,
//! and varint `seq` when present.

use super::*;

/// Most readings in one row: bounds what trimming a row at an edge rewrites.
pub(super) const MAX_CHUNK: i64 = super::READINGS_PER_ROW as i64;

/// One reading as a chunk holds it (its id is the chunk's first plus its place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub series: i64,
    pub ts: i64,
    pub bits: i64,
    pub seq: Option<i64>,
}

/// A chunk row.
#[derive(Debug, Clone)]
pub(super) struct Chunk {
    pub first: i64,
    pub last: i64,
    pub device: i64,
    pub entries: Vec<Entry>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// A chunk's body.
pub(super) fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 14);
    let mut prev = 0i64;
    for e in entries {
        put_varint(
            &mut out,
            (e.series as u64) << 1 | u64::from(e.seq.is_some()),
        );
        put_varint(&mut out, zigzag(e.ts.wrapping_sub(prev)));
        prev = e.ts;
        out.extend_from_slice(&e.bits.to_le_bytes());
        if let Some(s) = e.seq {
            put_varint(&mut out, s as u64);
        }
    }
    out
}

/// The `n` readings of a body, or `None` if it does not hold exactly `n`.
pub(super) fn decode(body: &[u8], n: usize) -> Option<Vec<Entry>> {
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    let mut prev = 0i64;
    while at < body.len() {
        let head = get_varint(body, &mut at)?;
        let ts = prev.wrapping_add(unzigzag(get_varint(body, &mut at)?));
        prev = ts;
        let bits = i64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
        at += 8;
        let seq = if head & 1 == 1 {
            Some(get_varint(body, &mut at)? as i64)
        } else {
            None
        };
        out.push(Entry {
            series: (head >> 1) as i64,
            ts,
            bits,
            seq,
        });
    }
    (out.len() == n).then_some(out)
}

/// The readings of the row holding ids `first..=last`, or `None` if its bounds are not
/// those of a row (at most [`MAX_CHUNK`]) or its body does not hold that many.
pub(super) fn decode_row(first: i64, last: i64, body: &[u8]) -> Option<Vec<Entry>> {
    let n = last.checked_sub(first)?.checked_add(1)?;
    if !(1..=MAX_CHUNK).contains(&n) {
        return None;
    }
    decode(body, n as usize)
}

/// The time of the oldest reading queued behind `conn`.
pub(super) fn oldest_ts(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let row: Option<(i64, i64, Vec<u8>)> = conn
        .query_row(
            "SELECT first, last, body FROM chunks ORDER BY last LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(row.and_then(|(first, last, body)| decode_row(first, last, &body).map(|e| e[0].ts)))
}

/// The statement that finds the rows holding ids in `?1..=?2`: `last` bounds the scan, as
/// a row's first is at most [`MAX_CHUNK`] before its last.
const OVERLAPPING: &str = "SELECT first, last, device, body FROM chunks
     WHERE last >= ?1 AND last < ?3 AND first <= ?2 ORDER BY last";

/// The `?3` of [`OVERLAPPING`] for a range ending at `hi`.
fn scan_end(hi: i64) -> i64 {
    hi.saturating_add(MAX_CHUNK)
}

impl Store {
    fn chunk_err(&self, first: i64, last: i64) -> StoreError {
        StoreError::DamagedChunk {
            path: self.opts.path.clone(),
            first,
            last,
        }
    }

    /// A row read with [`OVERLAPPING`]'s columns, decoded.
    fn chunk(&self, row: &rusqlite::Row<'_>) -> Result<Chunk, StoreError> {
        let get = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, i64, i64, Vec<u8>)> {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        };
        let (first, last, device, body) = get(row).map_err(self.sql_err("reading the queue"))?;
        let entries = decode_row(first, last, &body).ok_or_else(|| self.chunk_err(first, last))?;
        Ok(Chunk {
            first,
            last,
            device,
            entries,
        })
    }

    /// Writes `rows` (in id order, each device's readings of the commit with consecutive
    /// ids) as chunk rows.
    pub(super) fn write_chunks(&self, rows: &[Row]) -> Result<(), StoreError> {
        let mut out: Vec<(i64, i64, i64, Vec<u8>)> = Vec::new();
        let mut at = 0;
        while at < rows.len() {
            let start = &rows[at];
            let mut end = at + 1;
            while end < rows.len()
                && rows[end].device == start.device
                && rows[end].id == rows[end - 1].id + 1
                && (end - at) < MAX_CHUNK as usize
            {
                end += 1;
            }
            let entries: Vec<Entry> = rows[at..end]
                .iter()
                .map(|r| Entry {
                    series: r.series,
                    ts: r.ts,
                    bits: r.bits,
                    seq: r.seq,
                })
                .collect();
            out.push((rows[end - 1].id, start.id, start.device, encode(&entries)));
            at = end;
        }
        self.insert_chunks(&out)
    }

    /// Inserts (last, first, device, body) rows.
    fn insert_chunks(&self, rows: &[(i64, i64, i64, Vec<u8>)]) -> Result<(), StoreError> {
        self.insert_rows(&self.front_sql.chunks, "storing readings", rows, |b, c| {
            b.bind(c.0)?;
            b.bind(c.1)?;
            b.bind(c.2)?;
            b.bind(&c.3)
        })
    }

    /// Puts back the readings of `c` that stay, as one row per id run.
    fn put_back(&self, c: &Chunk, keep: impl Fn(i64) -> bool) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        let mut run: Vec<Entry> = Vec::new();
        let mut run_first = 0;
        for (i, e) in c.entries.iter().enumerate() {
            let id = c.first + i as i64;
            if keep(id) {
                if run.is_empty() {
                    run_first = id;
                }
                run.push(*e);
            } else if !run.is_empty() {
                rows.push((id - 1, run_first, c.device, encode(&run)));
                run.clear();
            }
        }
        if !run.is_empty() {
            rows.push((c.last, run_first, c.device, encode(&run)));
        }
        self.insert_chunks(&rows)
    }

    /// Deletes the readings with ids in `lo..=hi`; returns each one's (device, series).
    /// Does not touch the in-memory counts. Several statements: run it inside a transaction.
    pub(super) fn delete_range(&self, lo: i64, hi: i64) -> Result<Vec<(i64, i64)>, StoreError> {
        let what = "deleting readings";
        let mut gone = Vec::new();
        // Rows inside the range, whole.
        let whole: Vec<(i64, i64, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "DELETE FROM chunks WHERE last >= ?1 AND last <= ?2 AND first >= ?1
                 RETURNING first, last, device, body",
            )
            .and_then(|mut s| {
                s.query_map(params![lo, hi], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(self.sql_err(what))?;
        for (first, last, device, body) in whole {
            let entries =
                decode_row(first, last, &body).ok_or_else(|| self.chunk_err(first, last))?;
            gone.extend(entries.iter().map(|e| (device, e.series)));
        }
        // The rows at the edges, which keep some of their readings.
        for c in self.overlapping(lo, hi)? {
            self.delete_row(c.last)?;
            self.put_back(&c, |id| id < lo || id > hi)?;
            for (i, e) in c.entries.iter().enumerate() {
                let id = c.first + i as i64;
                if id >= lo && id <= hi {
                    gone.push((c.device, e.series));
                }
            }
        }
        Ok(gone)
    }

    /// The rows holding ids in `lo..=hi`, decoded, in id order.
    pub(super) fn overlapping(&self, lo: i64, hi: i64) -> Result<Vec<Chunk>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(OVERLAPPING)
            .map_err(self.sql_err("reading the queue"))?;
        let mut rows = st
            .query(params![lo, hi, scan_end(hi)])
            .map_err(self.sql_err("reading the queue"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql_err("reading the queue"))? {
            out.push(self.chunk(row)?);
        }
        Ok(out)
    }

    fn delete_row(&self, last: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM chunks WHERE last = ?1")
            .and_then(|mut s| s.execute([last]))
            .map_err(self.sql_err("deleting readings"))?;
        Ok(())
    }

    /// The stored ids in `lo..=hi`, ascending (the row bounds alone: no body is read).
    pub(super) fn ids_in(&self, lo: i64, hi: i64) -> Result<Vec<i64>, StoreError> {
        let ranges: Vec<(i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT first, last FROM chunks
                 WHERE last >= ?1 AND last < ?3 AND first <= ?2 ORDER BY last",
            )
            .and_then(|mut s| {
                s.query_map(params![lo, hi, scan_end(hi)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect()
            })
            .map_err(self.sql_err("reading a refused batch"))?;
        Ok(ranges
            .into_iter()
            .flat_map(|(f, l)| f.max(lo)..=l.min(hi))
            .collect())
    }

    /// Up to `max` stored readings with ids in `after+1..=upto`, in id order, with their
    /// device and series ids.
    pub(super) fn read_entries(
        &self,
        after: i64,
        upto: i64,
        max: usize,
    ) -> Result<Vec<(i64, i64, Entry)>, StoreError> {
        let lo = after.saturating_add(1);
        let mut st = self
            .conn
            .prepare_cached(OVERLAPPING)
            .map_err(self.sql_err("reading a batch"))?;
        let mut rows = st
            .query(params![lo, upto, scan_end(upto)])
            .map_err(self.sql_err("reading a batch"))?;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(row) = rows.next().map_err(self.sql_err("reading a batch"))? else {
                break;
            };
            let c = self.chunk(row)?;
            for (i, e) in c.entries.iter().enumerate() {
                let id = c.first + i as i64;
                if id >= lo && id <= upto && out.len() < max {
                    out.push((id, c.device, *e));
                }
            }
        }
        Ok(out)
    }

    /// Deletes the `n` oldest readings of `device` (or all it has); returns their series.
    pub(super) fn evict_oldest(&self, device: i64, n: u64) -> Result<Vec<i64>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT first, last, device, body FROM chunks WHERE device = ?1 ORDER BY last",
            )
            .map_err(self.sql_err("evicting readings"))?;
        let mut rows = st
            .query([device])
            .map_err(self.sql_err("evicting readings"))?;
        let mut series = Vec::new();
        let mut whole_upto = None;
        let mut partial = None;
        while (series.len() as u64) < n {
            let Some(row) = rows.next().map_err(self.sql_err("evicting readings"))? else {
                break;
            };
            let c = self.chunk(row)?;
            let left = (n - series.len() as u64) as usize;
            if c.entries.len() <= left {
                series.extend(c.entries.iter().map(|e| e.series));
                whole_upto = Some(c.last);
            } else {
                series.extend(c.entries[..left].iter().map(|e| e.series));
                partial = Some((c, left as i64));
            }
        }
        drop(rows);
        drop(st);
        if let Some(upto) = whole_upto {
            self.conn
                .prepare_cached("DELETE FROM chunks WHERE device = ?1 AND last <= ?2")
                .and_then(|mut s| s.execute(params![device, upto]))
                .map_err(self.sql_err("evicting readings"))?;
        }
        if let Some((c, kept_from)) = partial {
            self.delete_row(c.last)?;
            let from = c.first + kept_from;
            self.put_back(&c, |id| id >= from)?;
        }
        Ok(series)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry() -> impl Strategy<Value = Entry> {
        (
            1i64..1 << 40,
            any::<i64>(),
            any::<i64>(),
            any::<Option<u64>>(),
        )
            .prop_map(|(series, ts, bits, seq)| Entry {
                series,
                ts,
                bits,
                seq: seq.map(|s| s as i64),
            })
    }

    proptest! {
        #[test]
        fn a_body_decodes_to_what_was_encoded(entries in prop::collection::vec(entry(), 1..200)) {
            let body = encode(&entries);
            prop_assert_eq!(decode(&body, entries.len()), Some(entries.clone()));
            // The wrong count, or a cut body, is caught.
            prop_assert_eq!(decode(&body, entries.len() + 1), None);
            prop_assert_eq!(decode(&body[..body.len() - 1], entries.len()), None);
        }
    }

    #[test]
    fn a_row_whose_bounds_are_not_a_row_is_refused_before_anything_is_allocated() {
        let body = encode(&[Entry {
            series: 1,
            ts: 1,
            bits: 0,
            seq: None,
        }]);
        assert!(decode_row(3, 3, &body).is_some());
        assert_eq!(decode_row(4, 3, &body), None);
        assert_eq!(decode_row(0, i64::MAX, &body), None);
        assert_eq!(decode_row(i64::MIN, i64::MAX, &body), None);
        assert_eq!(decode_row(1, MAX_CHUNK + 1, &body), None);
    }

    #[test]
    fn a_typical_reading_takes_about_a_dozen_bytes() {
        let entries: Vec<Entry> = (0..100)
            .map(|i| Entry {
                series: 7,
                ts: 1_700_000_000_000_000 + i * 1_000_000,
                bits: (20.5f64 + i as f64).to_bits() as i64,
                seq: Some(1000 + i),
            })
            .collect();
        let per = encode(&entries).len() / entries.len();
        assert!((11..=16).contains(&per), "{per} bytes a reading");
    }
}
