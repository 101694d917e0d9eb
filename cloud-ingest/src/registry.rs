//! Pushing the payload schema registry to gateways.
//!
//! A receiver polls every tenant's set version ([`POLL`]); each gateway connection waits on
//! its tenant's version and sends the whole set on the control stream when the gateway has
//! another in force: on connect (the agent says which version it has in
//! [`Frame::SchemasApplied`]) and within a poll of a change, whichever replica of the API
//! made it. What each gateway reports back (the version in force, the schemas it refused
//! and why) is kept in `gateway_schemas`, which `GET /v1/payload-schemas` shows.
//!
//! [`Frame::SchemasApplied`]: plantlink_wire::frame::Frame::SchemasApplied

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plantlink_wire::frame::{SchemaSet, SchemasApplied};
use tokio::sync::watch;

use crate::postgres::{self, registry};

/// How often the set versions are read.
pub const POLL: Duration = Duration::from_secs(1);

/// The tenants' set versions, and a connection to read sets with.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    versions: Mutex<HashMap<String, watch::Sender<u64>>>,
    db: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Registry {
    /// Starts polling `url` until `shutdown`.
    pub fn start(url: &str, mut shutdown: watch::Receiver<bool>) -> Self {
        let r = Self {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                versions: Mutex::new(HashMap::new()),
                db: tokio::sync::Mutex::new(None),
            }),
        };
        let poller = r.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match poller.poll().await {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %format!("{e:#}"), "payload schema registry unreadable; gateways keep the sets they have");
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.changed() => break,
                }
            }
        });
        r
    }

    async fn with_db<T>(
        &self,
        f: impl AsyncFnOnce(&mut tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> anyhow::Result<T> {
        let mut db = self.inner.db.lock().await;
        if db.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *db = Some(postgres::connect(&self.inner.url).await?);
        }
        let Some(c) = db.as_mut() else {
            anyhow::bail!("no database connection");
        };
        match f(c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if c.is_closed() {
                    *db = None;
                }
                Err(e.into())
            }
        }
    }

    async fn poll(&self) -> anyhow::Result<()> {
        let versions = self
            .with_db(async |c| registry::versions(&*c).await)
            .await?;
        let mut map = self
            .inner
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (tenant, v) in versions {
            let v = u64::try_from(v).unwrap_or(0);
            match map.get(&tenant) {
                Some(tx) => {
                    tx.send_if_modified(|old| std::mem::replace(old, v) != v);
                }
                None => {
                    map.insert(tenant, watch::channel(v).0);
                }
            }
        }
        Ok(())
    }

    /// The tenant's set version, as it changes.
    pub fn watch(&self, tenant: &str) -> watch::Receiver<u64> {
        let mut map = self
            .inner
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(tenant.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// The tenant's whole set.
    pub async fn load(&self, tenant: &str) -> anyhow::Result<SchemaSet> {
        self.with_db(async |c| registry::set(c, tenant).await).await
    }

    /// Keeps what a gateway said of its set.
    pub async fn reported(
        &self,
        tenant: &str,
        gateway: &str,
        a: &SchemasApplied,
    ) -> anyhow::Result<()> {
        let refused = serde_json::Value::Array(
            a.refused
                .iter()
                .map(
                    |r| serde_json::json!({"id": r.id, "revision": r.revision, "reason": r.reason}),
                )
                .collect(),
        )
        .to_string();
        let version = i64::try_from(a.version).unwrap_or(i64::MAX);
        self.with_db(async |c| registry::reported(&*c, tenant, gateway, version, &refused).await)
            .await
    }

    /// Keeps what a gateway reported of its devices.
    pub async fn devices(
        &self,
        tenant: &str,
        gateway: &str,
        devices: &[plantlink_wire::frame::DeviceInfo],
    ) -> anyhow::Result<u64> {
        self.with_db(async |c| registry::devices(&*c, tenant, gateway, devices).await)
            .await
    }
}
