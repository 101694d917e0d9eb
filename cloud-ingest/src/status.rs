//! What this replica knows of each gateway's uplink, for `GET /v1/pipeline/lag`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use time::OffsetDateTime;

/// One gateway, as this replica has seen it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gateway {
    /// Tenant, from its certificate.
    pub tenant: String,
    /// Connections open now.
    pub connections: u32,
    /// When it last connected (RFC 3339).
    pub last_connected_at: Option<String>,
    /// When a batch of it was last acknowledged (RFC 3339).
    pub last_ack_at: Option<String>,
    /// Batches acknowledged since this replica started.
    pub batches_acked: u64,
    /// Readings in those batches.
    pub readings_acked: u64,
    /// Batches received and not yet answered.
    pub batches_in_flight: u64,
    /// Readings in those batches.
    pub readings_in_flight: u64,
    /// Batches answered with an error.
    pub batches_refused: u64,
    /// Readings whose identity was already stored with another value or other tags (kept
    /// in `reading_conflicts`, on the DLQ; the stored value stays).
    pub readings_conflicting: u64,
    /// What the gateway last reported of its own queue.
    pub queue: Option<Reported>,
}

/// A gateway's report of its queue ([`plantlink_wire::frame::Status`], or
/// [`plantlink_wire::frame::QueueReport`] from an agent that speaks revision 1.1).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reported {
    /// When it arrived (RFC 3339).
    pub at: String,
    /// Readings in the gateway's queue, not yet acknowledged.
    pub queued_readings: u64,
    /// Live readings not yet sent.
    pub live_waiting: u64,
    /// Whether a backlog is being drained.
    pub backlog: bool,
    /// Batches sent and not yet acknowledged.
    pub in_flight: u32,
    /// Bytes the queue holds; `None` from an agent older than revision 1.1.
    pub queued_bytes: Option<u64>,
    /// How old the oldest queued reading was at `at`, in seconds, as the gateway measured
    /// it; `None` when the queue is empty or the agent is older than revision 1.1 (it
    /// reports no `queued_bytes` either).
    pub oldest_age_seconds: Option<f64>,
}

impl Reported {
    fn new(s: &plantlink_wire::frame::Status, at: String) -> Self {
        Self {
            at,
            queued_readings: s.queued_readings,
            live_waiting: s.live_waiting,
            backlog: s.backlog,
            in_flight: s.in_flight,
            queued_bytes: None,
            oldest_age_seconds: None,
        }
    }
}

/// The table of gateways; cheap to clone.
#[derive(Debug, Clone, Default)]
// Keyed by (tenant, gateway id): the same id in two tenants is two gateways.
#[allow(clippy::type_complexity)]
pub struct Gateways(Arc<Mutex<BTreeMap<(String, String), Gateway>>>);

fn now() -> String {
    crate::kafka::rfc3339(
        (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).clamp(0, i64::MAX as i128) as i64,
    )
}

impl Gateways {
    fn with(&self, tenant: &str, gateway: &str, f: impl FnOnce(&mut Gateway)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry((tenant.to_owned(), gateway.to_owned()))
            .or_default());
    }

    /// A connection was admitted.
    pub fn connected(&self, gateway: &str, tenant: &str) {
        self.with(tenant, gateway, |g| {
            g.tenant = tenant.to_owned();
            g.connections += 1;
            g.last_connected_at = Some(now());
        });
    }

    /// The gateway reported its queue (revision 1).
    pub fn reported(&self, tenant: &str, gateway: &str, s: &plantlink_wire::frame::Status) {
        let r = Reported::new(s, now());
        self.with(tenant, gateway, |g| g.queue = Some(r));
    }

    /// The gateway reported its queue (revision 1.1).
    pub fn reported_queue(
        &self,
        tenant: &str,
        gateway: &str,
        q: &plantlink_wire::frame::QueueReport,
    ) {
        let r = Reported {
            queued_bytes: Some(q.queued_bytes),
            oldest_age_seconds: q.oldest_age_ms.map(|ms| ms as f64 / 1000.0),
            ..Reported::new(&q.status, now())
        };
        self.with(tenant, gateway, |g| g.queue = Some(r));
    }

    /// A connection ended.
    pub fn disconnected(&self, tenant: &str, gateway: &str) {
        self.with(tenant, gateway, |g| {
            g.connections = g.connections.saturating_sub(1)
        });
    }

    /// A batch of `readings` entered the pipeline.
    pub fn received(&self, tenant: &str, gateway: &str, readings: u64) {
        self.with(tenant, gateway, |g| {
            g.batches_in_flight += 1;
            g.readings_in_flight += readings;
        });
    }

    /// A batch that entered the pipeline was answered.
    pub fn answered(&self, tenant: &str, gateway: &str, readings: u64, acked: bool) {
        self.with(tenant, gateway, |g| {
            g.batches_in_flight = g.batches_in_flight.saturating_sub(1);
            g.readings_in_flight = g.readings_in_flight.saturating_sub(readings);
            if acked {
                g.batches_acked += 1;
                g.readings_acked += readings;
                g.last_ack_at = Some(now());
            } else {
                g.batches_refused += 1;
            }
        });
    }

    /// Readings of a batch of the gateway conflicted with stored ones.
    pub fn conflicting(&self, tenant: &str, gateway: &str, readings: u64) {
        self.with(tenant, gateway, |g| g.readings_conflicting += readings);
    }

    /// The gateways of `tenant`.
    pub fn of_tenant(&self, tenant: &str) -> BTreeMap<String, Gateway> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|((_, gw), g)| (gw.clone(), g.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_gateway_id_in_two_tenants_is_two_gateways() {
        let g = Gateways::default();
        g.connected("gw-x", "acme");
        g.connected("gw-x", "beta");
        g.received("acme", "gw-x", 100);
        g.answered("acme", "gw-x", 100, true);
        g.disconnected("beta", "gw-x");
        let acme = g.of_tenant("acme");
        let beta = g.of_tenant("beta");
        assert_eq!(
            (acme["gw-x"].connections, acme["gw-x"].readings_acked),
            (1, 100)
        );
        assert_eq!(
            (beta["gw-x"].connections, beta["gw-x"].readings_acked),
            (0, 0)
        );
        assert_eq!(beta["gw-x"].tenant, "beta");
        assert!(g.of_tenant("gamma").is_empty());
    }

    #[test]
    fn a_revision_1_1_report_carries_bytes_and_the_oldest_age_and_a_status_does_not() {
        use plantlink_wire::frame::{QueueReport, Status};
        let g = Gateways::default();
        let status = Status {
            queued_readings: 7,
            live_waiting: 2,
            backlog: true,
            in_flight: 1,
        };
        g.reported("acme", "new", &status);
        g.reported_queue(
            "acme",
            "newer",
            &QueueReport {
                status,
                queued_bytes: 896,
                oldest_age_ms: Some(2_250),
            },
        );
        let acme = g.of_tenant("acme");
        let old = acme["new"].queue.as_ref().unwrap();
        let new = acme["newer"].queue.as_ref().unwrap();
        assert_eq!(
            (
                old.queued_readings,
                old.queued_bytes,
                old.oldest_age_seconds
            ),
            (7, None, None)
        );
        assert_eq!(
            (
                new.queued_readings,
                new.backlog,
                new.queued_bytes,
                new.oldest_age_seconds
            ),
            (7, true, Some(896), Some(2.25))
        );
    }
}
