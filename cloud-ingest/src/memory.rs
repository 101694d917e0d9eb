//! The ingest memory budget: the bytes that batches being read, decoded and written may
//! hold at once, across every gateway (`ingest.max_buffered_mib`).
//!
//! A stream reserves a batch's frame length before it reads the body, then (giving that back
//! and taking it again whole, so that it never waits holding part of what it needs) the
//! batch's worst case before it decodes it: the decoder's limits bound the expansion. After
//! decoding it shrinks the reservation to what the readings take, which is held until the
//! batch is acknowledged. A stream that cannot reserve stops reading, so QUIC flow control
//! pushes back on its gateway and nothing more is buffered.
//!
//! One gateway may hold at most a quarter of the budget, so a gateway flooding with
//! maximum-expansion batches leaves the rest to the others. A batch whose worst case is more
//! than that share is refused (too large) rather than reserved at less, so what is reserved
//! is a bound: at the default 1024 MiB, any batch the decoder's limits allow fits (at most
//! about 190 MiB: 64 MiB of strings, 500,000 tags, 100,000 readings, 32 MiB of body).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use plantlink_model::Reading;
use plantlink_wire::batch::Limits;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes a decoded reading takes besides its strings: the struct, the allocations' headers
/// and its share of a tags map. Measured with a counting allocator
/// (tests/memory_estimate.rs), with headroom.
const READING_OVERHEAD: usize = 256;
/// Bytes a tag takes besides its key and value: its share of the map's nodes and the
/// allocations' headers (measured: about 125).
const TAG_OVERHEAD: usize = 128;

/// The budget, shared by every connection of a server.
#[derive(Debug, Clone)]
pub struct Memory {
    global: Arc<Semaphore>,
    share: usize,
    /// Each gateway's share, by (tenant, gateway id).
    #[allow(clippy::type_complexity)]
    gateways: Arc<Mutex<HashMap<(Arc<str>, Arc<str>), Arc<Semaphore>>>>,
}

/// Bytes reserved for one batch, given back when dropped.
#[derive(Debug)]
pub struct Hold {
    global: Option<OwnedSemaphorePermit>,
    local: Option<OwnedSemaphorePermit>,
}

impl Hold {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.global.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Gives back all but `bytes` (keeps what is held if that is less).
    pub fn shrink_to(&mut self, bytes: usize) {
        let held = self.bytes();
        if bytes >= held {
            return;
        }
        let give = held - bytes;
        for p in [&mut self.global, &mut self.local] {
            if let Some(permit) = p {
                if bytes == 0 {
                    *p = None;
                } else {
                    drop(permit.split(give));
                }
            }
        }
    }
}

impl Memory {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            global: Arc::new(Semaphore::new(bytes)),
            share: (bytes / 4).max(1),
            gateways: Arc::default(),
        }
    }

    /// Most bytes one gateway may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Bytes free now, across gateways.
    pub fn available(&self) -> usize {
        self.global.available_permits()
    }

    /// Reserves `bytes` for `gateway` (at most its share: callers refuse what needs more),
    /// waiting until both its share and the whole budget have room. `None` once the server
    /// is stopping.
    pub async fn reserve(
        &self,
        tenant: &Arc<str>,
        gateway: &Arc<str>,
        bytes: usize,
    ) -> Option<Hold> {
        let n = bytes.clamp(1, self.share) as u32;
        let local = {
            let mut map = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
            map.entry((tenant.clone(), gateway.clone()))
                .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
                .clone()
        };
        let local = local.acquire_many_owned(n).await.ok()?;
        let global = self.global.clone().acquire_many_owned(n).await.ok()?;
        Some(Hold {
            global: Some(global),
            local: Some(local),
        })
    }
}

/// The most a batch of `readings` readings whose zstd body is `body` bytes can take while
/// and after it is decoded under `limits`: the body itself, the strings the decoder allows,
/// and every reading with the most tags, up to the tags the decoder allows.
pub fn worst_case(readings: usize, body: usize, limits: &Limits) -> usize {
    let readings = readings.min(limits.max_readings);
    // Each reading names a tenant, device and metric and its tags, none longer than allowed.
    let strings = readings
        .saturating_mul((3 + 2 * limits.max_tags) * limits.max_string_len)
        .min(limits.max_decoded_string_bytes);
    body.min(limits.max_body_bytes)
        .saturating_add(strings)
        .saturating_add(readings.saturating_mul(READING_OVERHEAD))
        .saturating_add(
            readings
                .saturating_mul(limits.max_tags)
                .min(limits.max_decoded_tags)
                .saturating_mul(TAG_OVERHEAD),
        )
}

/// What decoded readings take, estimated as [`worst_case`] counts them.
pub fn decoded_size(readings: &[Reading]) -> usize {
    readings
        .iter()
        .map(|r| {
            READING_OVERHEAD
                + r.tenant.len()
                + r.device.len()
                + r.metric.len()
                + r.tags
                    .iter()
                    .map(|(k, v)| TAG_OVERHEAD + k.len() + v.len())
                    .sum::<usize>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gateway_holds_at_most_its_share_and_shrinks_to_what_it_uses() {
        let m = Memory::new(1000);
        let (a, b): (Arc<str>, Arc<str>) = ("gw-a".into(), "gw-b".into());
        let t: Arc<str> = "acme".into();
        let mut h = m.reserve(&t, &a, 250).await.unwrap();
        assert_eq!((h.bytes(), m.available()), (250, 750));
        // A's share is used up: a second reservation waits, B's does not.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), m.reserve(&t, &a, 1));
        assert!(waiting.await.is_err(), "over its share, gateway A waits");
        let hb = m.reserve(&t, &b, 5000).await.unwrap();
        assert_eq!(hb.bytes(), 250, "clamped to the share");
        // Shrinking gives the rest back to both the gateway and the budget.
        h.shrink_to(40);
        assert_eq!((h.bytes(), m.available()), (40, 710));
        let h2 = m.reserve(&t, &a, 210).await.unwrap();
        assert_eq!(h.bytes() + h2.bytes(), 250);
        drop((h, h2));
        drop(hb);
        assert_eq!(m.available(), 1000);
    }
}
