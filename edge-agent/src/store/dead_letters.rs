//! Dead letters (what could not be decoded or stored, kept with its payload) and their
//! replay: `edge-agent queue replay-dead-letters` marks them, the writer replays them.

use super::*;

/// Marks every dead letter of `reason` that kept its whole payload (MQTT ones: a CoAP
/// request's path is not kept) for replay by the agent; returns how many were marked and
/// how many cannot be replayed. A running agent replays them within a second, a stopped
/// one when it starts.
pub fn mark_for_replay(path: &Path, reason: &str) -> rusqlite::Result<(usize, usize)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS replay_requests (id INTEGER PRIMARY KEY)")?;
    let marked = conn.execute(
        "INSERT OR IGNORE INTO replay_requests (id)
         SELECT id FROM dead_letters WHERE reason = ?1 AND source = 'mqtt' AND size <= length(payload)",
        [reason],
    )?;
    let cannot: i64 = conn.query_row(
        "SELECT count(*) FROM dead_letters WHERE reason = ?1 AND NOT (source = 'mqtt' AND size <= length(payload))",
        [reason],
        |r| r.get(0),
    )?;
    Ok((marked, cannot as usize))
}

/// Largest dead-letter payload kept, in bytes.
pub const DEAD_LETTER_PAYLOAD_CAP: usize = 4096;

impl Store {
    /// Dead letters marked for replay (`edge-agent queue replay-dead-letters`), oldest first.
    pub fn replay_pending(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT d.id, d.received_us, d.source, d.origin, d.reason, d.detail, d.size, d.payload
                 FROM replay_requests r JOIN dead_letters d ON d.id = r.id ORDER BY d.id LIMIT ?1",
            )
            .and_then(|mut s| s.query_map([limit as i64], read::dead_letter_row)?.collect())
            .map_err(self.sql_err("reading dead letters to replay"))
    }

    /// Marks the dead letters of `origin` with one of `reasons` for replay; returns how many.
    pub fn mark_replay(&mut self, origin: &str, reasons: &[&str]) -> Result<usize, StoreError> {
        let mut n = 0;
        for reason in reasons {
            n += self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO replay_requests (id)
                     SELECT id FROM dead_letters WHERE origin = ?1 AND reason = ?2
                       AND source = 'mqtt' AND size <= length(payload)",
                )
                .and_then(|mut s| s.execute([origin, reason]))
                .map_err(self.sql_err("marking dead letters for replay"))?;
        }
        Ok(n)
    }

    /// Forgets replay requests whose dead letters cannot be replayed (they stay dead letters).
    pub fn unmark_replay(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM replay_requests WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replay request"))?;
        }
        Ok(())
    }

    /// Forgets replayed dead letters and their requests (in the open transaction), and
    /// requests whose dead letter is gone.
    pub fn replayed(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replayed dead letter"))?;
            self.conn
                .prepare_cached("DELETE FROM replay_requests WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replayed dead letter"))?;
        }
        self.conn
            .execute(
                "DELETE FROM replay_requests WHERE id NOT IN (SELECT id FROM dead_letters)",
                [],
            )
            .map_err(self.sql_err("forgetting replay requests"))?;
        Ok(())
    }

    /// Records a dead letter, inside a transaction. `size` is the whole message's size, which
    /// is more than `payload` when only its first bytes were kept.
    #[allow(clippy::too_many_arguments)]
    pub fn dead_letter(
        &mut self,
        received_us: i64,
        source: &str,
        origin: &str,
        reason: &str,
        detail: &str,
        payload: &[u8],
        size: usize,
    ) -> Result<(), StoreError> {
        let kept = &payload[..payload.len().min(DEAD_LETTER_PAYLOAD_CAP)];
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (received_us, source, origin, reason, detail, size, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    received_us,
                    source,
                    origin,
                    reason,
                    detail,
                    size.max(payload.len()) as i64,
                    kept
                ])
            })
            .map_err(self.sql_err("storing a dead letter"))?;
        self.dead_letters_last = self.conn.last_insert_rowid();
        Ok(())
    }
}
