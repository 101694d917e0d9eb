//! Rebuilding the store's in-memory state (devices, series, counts, the dedupe generations'
//! bounds) from the queue file, on open and after a rollback.

use std::collections::HashMap;

use plantlink_model::Tags;
use rusqlite::OptionalExtension;

use super::devices::{device_cost, series_cost};
use super::{DeviceState, SeriesState, Store, StoreError, chunks, fresh};

impl Store {
    /// Rebuilds the in-memory indexes and counts from the file.
    pub(super) fn load(&mut self) -> Result<(), StoreError> {
        let e = |source| StoreError::Sqlite {
            path: self.opts.path.clone(),
            what: "loading the queue",
            source,
        };
        self.device_ids.clear();
        self.devices.clear();
        self.series_ids.clear();
        self.series.clear();
        self.state_bytes = 0;
        let mut stmt = self
            .conn
            .prepare("SELECT id, name FROM devices")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(e)?;
        for row in rows {
            let (id, name) = row.map_err(e)?;
            self.state_bytes += device_cost(&name);
            self.device_ids.insert(name.clone(), id);
            self.devices.insert(
                id,
                DeviceState {
                    name,
                    readings: 0,
                    last_us: 0,
                    series: 0,
                    sent: 0,
                },
            );
        }
        drop(stmt);
        let mut stmt = self
            .conn
            .prepare("SELECT id, device, metric, tags FROM series")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (id, device, metric, tags) = row.map_err(e)?;
            let parsed: Tags = if tags.is_empty() {
                Tags::new()
            } else {
                serde_json::from_str(&tags).unwrap_or_default()
            };
            self.state_bytes += series_cost(&metric, tags.len());
            if let Some(d) = self.devices.get_mut(&device) {
                d.series += 1;
            }
            self.series.insert(
                id,
                SeriesState {
                    device,
                    metric: metric.clone(),
                    tags: parsed,
                    tags_len: tags.len(),
                    readings: 0,
                    last_us: 0,
                },
            );
            self.series_ids.insert((device, metric, tags), id);
        }
        drop(stmt);
        // Every chunk is read once: per-series counts are inside the bodies.
        let mut per_device: HashMap<i64, u64> = HashMap::new();
        let mut per_series: HashMap<i64, u64> = HashMap::new();
        let mut total = 0;
        let mut last_id = 0;
        let mut stmt = self
            .conn
            .prepare("SELECT first, last, device, body FROM chunks ORDER BY last")
            .map_err(e)?;
        let mut rows = stmt.query([]).map_err(e)?;
        while let Some(row) = rows.next().map_err(e)? {
            let (first, last, device, body): (i64, i64, i64, Vec<u8>) = (
                row.get(0).map_err(e)?,
                row.get(1).map_err(e)?,
                row.get(2).map_err(e)?,
                row.get(3).map_err(e)?,
            );
            let damaged = || StoreError::DamagedChunk {
                path: self.opts.path.clone(),
                first,
                last,
            };
            let entries = chunks::decode_row(first, last, &body).ok_or_else(damaged)?;
            *per_device.entry(device).or_default() += entries.len() as u64;
            for en in &entries {
                *per_series.entry(en.series).or_default() += 1;
            }
            total += entries.len() as u64;
            last_id = last;
        }
        drop(rows);
        drop(stmt);
        for (device, n) in per_device {
            if let Some(d) = self.devices.get_mut(&device) {
                d.readings = n;
            }
        }
        for (series, n) in per_series {
            if let Some(st) = self.series.get_mut(&series) {
                st.readings = n;
            }
        }
        self.total = total;
        self.last_id = last_id;
        // AUTOINCREMENT never reuses an id: the next is past the highest ever given.
        let given: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'chunks'",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;
        self.next_id = given.max(self.last_id) + 1;
        self.dead_letters_last = self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM dead_letters", [], |r| {
                r.get(0)
            })
            .map_err(e)?;
        self.mqtt_msgs_last = self
            .conn
            .query_row(
                "SELECT max(coalesce((SELECT max(id) FROM mqtt_msgs), 0),
                            coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'mqtt_msgs'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;

        let meta = |key: &str| -> Result<Option<i64>, StoreError> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(e)
        };
        self.seen_current = meta("seen_current")?.unwrap_or(0) as u8 & 1;
        self.seen_rotated_us = meta("seen_rotated_us")?.unwrap_or(0);
        let mut newest = [fresh::UNKNOWN; 2];
        for (g, n) in newest.iter_mut().enumerate() {
            *n = match meta(&format!("seen{g}_ts_max"))? {
                Some(v) => v,
                None => {
                    let any: bool = self
                        .conn
                        .query_row(&format!("SELECT EXISTS (SELECT 1 FROM seen{g})"), [], |r| {
                            r.get(0)
                        })
                        .map_err(e)?;
                    if any { fresh::UNKNOWN } else { fresh::EMPTY }
                }
            };
        }
        self.fresh.rolled_back(newest);
        self.rate_limited.clear();
        Ok(())
    }
}
