//! The write pipeline between the gateways' streams and the database.
//!
//! A stream hands each decoded batch to [`Sink::submit`] and gets back a receiver that
//! resolves once the batch is committed. Writers (`[postgres] writers` connections) take
//! waiting batches, merge them up to `flush_max_readings` into one transaction, and resolve
//! them all after the commit. While one writer commits, another copies, so the database is
//! never idle waiting for a round trip.
//!
//! **Memory is bounded.** Every reading in the pipeline holds a permit from a budget of
//! `max_pending_readings`; `submit` waits for permits, the stream stops reading while it
//! waits, and QUIC flow control pushes back on the gateway. A slow database therefore slows
//! the gateways instead of filling the heap.
//!
//! **Nothing is lost.** A write that fails for a reason that may pass (connection lost,
//! server restarting, deadlock) is retried with backoff on a fresh connection, for as long as
//! it takes: the acks wait. A write the database refuses for good is retried batch by batch,
//! so one bad batch cannot fail the others merged with it, and only that batch gets an error.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use plantlink_model::Reading;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::Postgres;
use crate::postgres::maintain::{self, Partitions};
use crate::postgres::{self, Advance, Conflict, Flavor, Part, RefusedPart, Written};

/// What became of a batch: committed (with the readings that conflicted with ones already
/// stored, which the caller reports), or refused and why.
pub type Outcome = Result<Vec<Conflict>, String>;

/// What became of a backbone round: as [`Outcome`], or `Ok(None)` when fenced.
pub type Outcome2 = Result<Option<Vec<Conflict>>, String>;

/// A gateway's decoded batch.
#[derive(Debug)]
pub struct Batch {
    /// Tenant, from the certificate.
    pub tenant: Arc<str>,
    /// Gateway, from the certificate.
    pub gateway: Arc<str>,
    /// The readings.
    pub readings: Vec<Reading>,
}

#[derive(Debug)]
struct Job {
    batch: Batch,
    done: oneshot::Sender<Outcome>,
    _ticket: Ticket,
}

/// A batch's share of the reading budget. Its clones travel with the batch (to the writer,
/// and to whoever waits for other sinks); the share returns when the last one is dropped.
#[derive(Debug, Clone)]
pub struct Ticket(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl Ticket {
    /// A share of another budget (the scale-out receiver's, until Kafka has the batch).
    pub fn from_permit(permit: OwnedSemaphorePermit) -> Self {
        Self(Arc::new(permit))
    }
}

/// Newest reading time per (tenant, device), written to `devices.last_seen_at` now and
/// then instead of once per reading.
type LastSeen = Mutex<HashMap<(Arc<str>, String), i64>>;

/// The handle streams submit batches to; cheap to clone.
#[derive(Debug, Clone)]
pub struct Sink {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
    /// Closed when the last clone is dropped, which tells the upkeep to do its last round.
    _alive: mpsc::Sender<()>,
    budget: Arc<Semaphore>,
    max_permits: usize,
}

/// State the writers and upkeep share.
#[derive(Debug)]
struct Shared {
    budget: Arc<Semaphore>,
    cfg: Postgres,
    flavor: Flavor,
    partitions: Partitions,
    last_seen: LastSeen,
    /// TimescaleDB's policy jobs as last read (empty on plain PostgreSQL).
    jobs: Mutex<Vec<postgres::jobs::Job>>,
    /// The connection that keeps refused readings, opened when first needed.
    refused: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The connection of [`Sink::write_round`], opened when first needed.
    direct: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Sink {
    /// Starts the writers and, on plain PostgreSQL, the upkeep (partitions, rollups,
    /// retention); all run on `tasks` until every `Sink` clone is dropped.
    pub fn start(cfg: Postgres, flavor: Flavor, tasks: &mut JoinSet<()>) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let budget = Arc::new(Semaphore::new(cfg.max_pending_readings));
        let shared = Arc::new(Shared {
            budget: budget.clone(),
            flavor,
            // The event-time window reaches back at most the raw retention and ahead at most
            // MAX_FUTURE_SECS; a day of slack for writes that waited (upkeep drops what is
            // older anyway).
            partitions: Partitions::bounded(
                cfg.retention.raw_days + 1,
                (crate::config::MAX_FUTURE_SECS / 86_400) as u32 + 1,
            ),
            last_seen: Mutex::new(HashMap::new()),
            jobs: Mutex::new(Vec::new()),
            refused: tokio::sync::Mutex::new(None),
            direct: tokio::sync::Mutex::new(None),
            cfg,
        });
        for w in 0..shared.cfg.writers {
            tasks.spawn(writer(w, rx.clone(), shared.clone()));
        }
        let (alive, gone) = mpsc::channel(1);
        tasks.spawn(upkeep(shared.clone(), gone));
        let max_permits = shared.cfg.max_pending_readings;
        Self {
            shared: shared.clone(),
            tx,
            _alive: alive,
            budget,
            max_permits,
        }
    }

    /// Keeps readings left out of their batch in `refused_readings` (see
    /// [`maintain::keep_refused`]); the receiver resolves once they are committed, and the
    /// batch is acknowledged only then.
    pub fn keep_refused(
        &self,
        tenant: Arc<str>,
        gateway: Arc<str>,
        refused: Vec<(Reading, &'static str)>,
    ) -> oneshot::Receiver<Result<(), String>> {
        let shared = self.shared.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut c = shared.refused.lock().await;
            let result = async {
                if c.as_ref().is_none_or(|c| c.is_closed()) {
                    *c = Some(postgres::connect(&shared.cfg.url).await?);
                }
                let client = c.as_ref().expect("connected above");
                maintain::keep_refused(client, &tenant, &gateway, &refused).await
            }
            .await;
            let _ = tx.send(match result {
                Ok(_) => Ok(()),
                Err(e) => {
                    *c = None;
                    Err(format!(
                        "keeping {} refused readings in refused_readings failed: {e}; retry",
                        refused.len()
                    ))
                }
            });
        });
        rx
    }

    /// Writes one round of the backbone writer at once, beside the queued batches: `parts`,
    /// the `refused` readings and the consumer `offsets` in one transaction, retrying what may
    /// pass, as a queued batch is. `Ok(None)`: another member of the group had moved one of
    /// the offsets, and nothing was written. Its readings take no share of the budget: the
    /// writer bounds its rounds itself.
    pub async fn write_round(
        &self,
        parts: &[Part<'_>],
        refused: &[RefusedPart<'_>],
        offsets: &[Advance],
    ) -> Outcome2 {
        let mut client = self.shared.direct.lock().await;
        let started = std::time::Instant::now();
        let w = flush(
            &self.shared,
            &mut client,
            parts,
            refused,
            offsets,
            usize::MAX,
        )
        .await?;
        histogram!("plantlink_cloud_flush_seconds").record(started.elapsed().as_secs_f64());
        counter!("plantlink_cloud_flushes_total").increment(1);
        Ok(w.map(|w| {
            counter!("plantlink_cloud_readings_written_total", "sink" => "postgres")
                .increment(w.inserted);
            counter!("plantlink_cloud_readings_replayed_total").increment(w.replays);
            for p in parts {
                note_last_seen(&self.shared.last_seen, p.tenant, p.readings);
            }
            w.conflicts
        }))
    }

    /// The storage flavour.
    pub fn flavor(&self) -> Flavor {
        self.shared.flavor
    }

    /// TimescaleDB's policy jobs as the upkeep last read them (empty on plain PostgreSQL).
    pub fn timescale_jobs(&self) -> Vec<postgres::jobs::Job> {
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Readings received and not yet through every sink.
    pub fn pending(&self) -> usize {
        self.max_permits
            .saturating_sub(self.budget.available_permits())
    }

    /// Sets `plantlink_cloud_pending_readings` to what the budget holds now.
    pub fn update_gauge(&self) {
        pending_gauge(&self.budget, self.max_permits);
    }

    /// Takes `readings` permits from the budget, waiting while the pipeline holds
    /// `max_pending_readings`; `None` when shutting down.
    pub async fn reserve(&self, readings: usize) -> Option<Ticket> {
        let want = readings.clamp(1, self.max_permits) as u32;
        let permit = self.budget.clone().acquire_many_owned(want).await.ok()?;
        pending_gauge(&self.budget, self.max_permits);
        Some(Ticket(Arc::new(permit)))
    }

    /// Queues a batch; waits while the pipeline holds `max_pending_readings`. The receiver
    /// resolves after the commit.
    pub async fn submit(&self, batch: Batch) -> oneshot::Receiver<Outcome> {
        match self.reserve(batch.readings.len()).await {
            Some(ticket) => self.submit_reserved(batch, ticket).await,
            None => {
                let (done, rx) = oneshot::channel();
                let _ = done.send(Err("shutting down".into()));
                rx
            }
        }
    }

    /// Queues a batch whose share of the budget is already taken.
    pub async fn submit_reserved(
        &self,
        batch: Batch,
        ticket: Ticket,
    ) -> oneshot::Receiver<Outcome> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            batch,
            done,
            _ticket: ticket,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job).await {
            let _ = job.done.send(Err("shutting down".into()));
        }
        rx
    }
}

fn pending_gauge(budget: &Semaphore, max: usize) {
    gauge!("plantlink_cloud_pending_readings")
        .set(max.saturating_sub(budget.available_permits()) as f64);
}

async fn take(rx: &tokio::sync::Mutex<mpsc::Receiver<Job>>, max: usize) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut n = first.batch.readings.len();
    let mut jobs = vec![first];
    while n < max {
        match rx.try_recv() {
            Ok(j) => {
                n += j.batch.readings.len();
                jobs.push(j);
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

async fn writer(id: usize, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>, shared: Arc<Shared>) {
    let mut client: Option<tokio_postgres::Client> = None;
    while let Some(jobs) = take(&rx, shared.cfg.flush_max_readings).await {
        let started = std::time::Instant::now();
        let outcomes: Vec<Result<Written, String>> = match flush_jobs(
            &shared,
            &mut client,
            &jobs,
            id,
        )
        .await
        {
            Ok(w) => share_out(&jobs, w),
            Err(e) if jobs.len() > 1 => {
                tracing::warn!(writer = id, error = %e, "a merged write was refused; writing its batches one by one");
                let mut out = Vec::with_capacity(jobs.len());
                for j in &jobs {
                    out.push(flush_jobs(&shared, &mut client, std::slice::from_ref(j), id).await);
                }
                out
            }
            Err(e) => vec![Err(e)],
        };
        histogram!("plantlink_cloud_flush_seconds").record(started.elapsed().as_secs_f64());
        counter!("plantlink_cloud_flushes_total").increment(1);
        let (mut written, mut replays) = (0, 0);
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            if let Ok(w) = &outcome {
                written += w.inserted;
                replays += w.replays;
                note_last_seen(&shared.last_seen, &job.batch.tenant, &job.batch.readings);
            }
            let _ = job.done.send(outcome.map(|w| w.conflicts));
        }
        counter!("plantlink_cloud_readings_written_total", "sink" => "postgres").increment(written);
        counter!("plantlink_cloud_readings_replayed_total").increment(replays);
        pending_gauge(&shared.budget, shared.cfg.max_pending_readings);
    }
}

/// Splits one merged write's result over its jobs: each conflict to the job whose batch
/// holds that reading (a gateway may have several batches in one flush, and the report names
/// the batch); the counts to the first job.
fn share_out(jobs: &[Job], mut w: Written) -> Vec<Result<Written, String>> {
    let mut out: Vec<Written> = vec![Written::default(); jobs.len()];
    for c in std::mem::take(&mut w.conflicts) {
        let holds = |j: &Job| {
            *j.batch.tenant == *c.tenant
                && *j.batch.gateway == *c.gateway
                && j.batch.readings.iter().any(|r| {
                    r.ts.0 == c.ts_us
                        && r.device == c.device
                        && r.metric == c.metric
                        && plantlink_model::value_key(r.value)
                            == plantlink_model::value_key(c.value)
                })
        };
        let i = jobs.iter().position(holds).unwrap_or(0);
        out[i].conflicts.push(c);
    }
    out[0].inserted = w.inserted;
    out[0].replays = w.replays;
    out.into_iter().map(Ok).collect()
}

fn note_last_seen(seen: &LastSeen, tenant: &str, readings: &[Reading]) {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let tenant: Arc<str> = Arc::from(tenant);
    let mut last: Option<(&str, i64)> = None;
    let mut put = |device: &str, ts: i64| {
        let e = seen
            .entry((tenant.clone(), device.to_owned()))
            .or_insert(ts);
        *e = (*e).max(ts);
    };
    for r in readings {
        match &mut last {
            Some((d, t)) if *d == r.device => *t = (*t).max(r.ts.0),
            _ => {
                if let Some((d, t)) = last {
                    put(d, t);
                }
                last = Some((&r.device, r.ts.0));
            }
        }
    }
    if let Some((d, t)) = last {
        put(d, t);
    }
}

/// Writes `jobs` in one transaction, retrying what may pass; `Err` only for a refusal.
async fn flush_jobs(
    shared: &Shared,
    client: &mut Option<tokio_postgres::Client>,
    jobs: &[Job],
    id: usize,
) -> Result<Written, String> {
    let parts: Vec<Part<'_>> = jobs
        .iter()
        .map(|j| Part {
            tenant: &j.batch.tenant,
            gateway: &j.batch.gateway,
            readings: &j.batch.readings,
        })
        .collect();
    let w = flush(shared, client, &parts, &[], &[], id).await?;
    Ok(w.unwrap_or_default())
}

/// Writes `parts`, `refused` and `offsets` in one transaction, retrying what may pass; `Err`
/// only for a refusal, `Ok(None)` when an offset was fenced (never without offsets).
async fn flush(
    shared: &Shared,
    client: &mut Option<tokio_postgres::Client>,
    parts: &[Part<'_>],
    refused: &[RefusedPart<'_>],
    offsets: &[Advance],
    id: usize,
) -> Result<Option<Written>, String> {
    let days: BTreeSet<i64> = if shared.flavor == Flavor::Plain {
        parts
            .iter()
            .flat_map(|p| p.readings.iter().map(|r| maintain::day_of(r.ts.0)))
            .collect()
    } else {
        BTreeSet::new()
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let c = postgres::connect(&shared.cfg.url).await?;
                c.batch_execute(postgres::STAGING).await?;
                *client = Some(c);
            }
            let Some(c) = client.as_mut() else {
                unreachable!("connected above")
            };
            if !days.is_empty() {
                let outside = shared.partitions.ensure(c, &days).await?;
                if let (Some(first), Some(last)) = (outside.first(), outside.last()) {
                    return Ok(Err(format!(
                        "readings for {} to {} are outside the days this service creates \
                         partitions for (the raw retention back, a week ahead); retry, and the \
                         cloud's window leaves them out",
                        maintain::partition_name(*first).unwrap_or_default(),
                        maintain::partition_name(*last).unwrap_or_default(),
                    )));
                }
            }
            postgres::write_advancing(c, parts, refused, offsets)
                .await
                .map(Ok)
        }
        .await;
        match result {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(why)) => {
                tracing::error!(writer = id, %why, "write refused before it reached PostgreSQL");
                return Err(format!("storage refused the batch: {why}"));
            }
            Err(e) if postgres::transient(&e) => {
                counter!("plantlink_cloud_write_retries_total").increment(1);
                if e.code().map(|c| c.code()) == Some("23514") {
                    shared.partitions.forget();
                }
                tracing::warn!(writer = id, error = %e, retry_in = ?backoff, "PostgreSQL write failed; retrying (acks wait)");
                if client.as_ref().is_some_and(|c| c.is_closed()) || e.code().is_none() {
                    *client = None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(writer = id, error = %e, "PostgreSQL refused a write");
                return Err(format!("storage refused the batch: {e}"));
            }
        }
    }
}

/// Periodic upkeep: `devices.last_seen_at` every `rollup_interval_ms`; as often, the rollups
/// (plain: re-rolled; TimescaleDB: refreshed where writes touched them, and its jobs read
/// every [`JOBS_EVERY`]); every ten minutes kept conflicts past retention and, on plain,
/// partitions and retention. When the
/// sink is dropped it does one last round at once and ends.
async fn upkeep(shared: Arc<Shared>, mut gone: mpsc::Receiver<()>) {
    let tick = Duration::from_millis(shared.cfg.rollup_interval_ms);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut last_partitions = std::time::Instant::now();
    let mut last_jobs = None;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(tick) => false,
            _ = gone.recv() => true,
        };
        if let Err(e) =
            upkeep_once(&shared, &mut client, &mut last_partitions, &mut last_jobs).await
        {
            tracing::warn!(error = %e, "upkeep failed; trying again next round");
            client = None;
        }
        if stopping {
            return;
        }
    }
}

/// How often the upkeep reads TimescaleDB's job state.
const JOBS_EVERY: Duration = Duration::from_secs(15);

async fn upkeep_once(
    shared: &Shared,
    client: &mut Option<tokio_postgres::Client>,
    last_partitions: &mut std::time::Instant,
    last_jobs: &mut Option<std::time::Instant>,
) -> Result<(), tokio_postgres::Error> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(postgres::connect(&shared.cfg.url).await?);
    }
    let Some(c) = client.as_mut() else {
        unreachable!("connected above")
    };
    let seen: Vec<(String, String, i64)> = {
        let mut m = shared.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        m.drain()
            .map(|((t, d), ts)| (t.to_string(), d, ts))
            .collect()
    };
    if let Err(e) = maintain::last_seen(c, &seen).await {
        // Put them back for the next round.
        let mut m = shared.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (t, d, ts) in seen {
            let e = m.entry((Arc::from(t), d)).or_insert(ts);
            *e = (*e).max(ts);
        }
        return Err(e);
    }
    match shared.flavor {
        Flavor::Plain => {
            postgres::refresh::skip_past_retention(c, shared.cfg.retention.raw_days).await?;
            let rolled = maintain::roll(c).await?;
            counter!("plantlink_cloud_rollup_buckets_total").increment(rolled);
        }
        Flavor::Timescale => {
            let r = postgres::refresh::refresh(c, shared.cfg.retention.raw_days).await?;
            counter!("plantlink_cloud_rollup_buckets_total").increment(r.hours);
            if last_jobs.is_none_or(|t| t.elapsed() >= JOBS_EVERY) {
                let jobs = postgres::jobs::read(c).await?;
                let mut known = shared.jobs.lock().unwrap_or_else(|p| p.into_inner());
                postgres::jobs::report(&jobs, &known);
                *known = jobs;
                *last_jobs = Some(std::time::Instant::now());
            }
        }
    }
    if last_partitions.elapsed() >= Duration::from_secs(600) {
        maintain::expire_conflicts(c, shared.cfg.retention.raw_days).await?;
        if shared.flavor == Flavor::Plain {
            let up = maintain::partitions(c, &shared.cfg).await?;
            if !up.created.is_empty() || !up.dropped.is_empty() {
                tracing::info!(created = ?up.created, dropped = ?up.dropped, rollup_rows_deleted = up.rollups_deleted, "partition upkeep");
            }
        }
        *last_partitions = std::time::Instant::now();
    }
    Ok(())
}
