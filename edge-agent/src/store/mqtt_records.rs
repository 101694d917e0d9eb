//! Records of committed MQTT messages, by (packet id, content hash), so a redelivery of one
//! the broker did not see acknowledged is acknowledged again without being stored twice.

use super::*;

/// Committed MQTT messages remembered for recognising redeliveries: four times the packet
/// id space, so a message is forgotten only after its id has been reused four times.
pub const MQTT_MSGS_KEEP: i64 = 4 * 65_536;

impl Store {
    /// The record of a committed MQTT message with this (packet id, payload hash), if any:
    /// a redelivery that matches is acknowledged without being stored again.
    pub fn mqtt_committed(&mut self, pkid: u16, hash: i64) -> Result<Option<i64>, StoreError> {
        // A redelivery in the same group as the message it repeats.
        if let Some(&(id, _, _)) = self
            .mqtt_pending
            .iter()
            .rev()
            .find(|m| (m.1, m.2) == (pkid, hash))
        {
            return Ok(Some(id));
        }
        self.conn
            .prepare_cached("SELECT id FROM mqtt_msgs WHERE pkid = ?1 AND hash = ?2")
            .and_then(|mut s| s.query_row(params![pkid, hash], |r| r.get(0)).optional())
            .map_err(self.sql_err("checking an MQTT redelivery"))
    }

    /// Records that the message with this packet id and payload hash is being committed
    /// (again as the newest, if it was known); returns the record's id.
    pub fn mqtt_record(&mut self, pkid: u16, hash: i64) -> Result<i64, StoreError> {
        self.mqtt_msgs_last += 1;
        self.mqtt_pending.push((self.mqtt_msgs_last, pkid, hash));
        Ok(self.mqtt_msgs_last)
    }

    /// Forgets MQTT message records whose PUBACK the broker is known to have processed:
    /// those messages can no longer be redelivered, and a stale record could only make a
    /// new message with the same packet id and content look like a redelivery.
    pub fn mqtt_forget(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM mqtt_msgs WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting confirmed MQTT messages"))?;
        }
        Ok(())
    }
}
