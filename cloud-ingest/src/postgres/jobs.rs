//! Watching TimescaleDB's background jobs: its policies (refresh, compression, retention)
//! run in TimescaleDB's scheduler, and when they fail, rollups, compression and retention
//! silently stop. The upkeep reads `timescaledb_information.job_stats` and `job_errors`,
//! exports `plantlink_cloud_timescale_job_failures_total{job}` and
//! `plantlink_cloud_timescale_job_last_success_age_seconds{job}` (-1 before any success),
//! logs a warning with TimescaleDB's own error text when a job's failures grow, and keeps the
//! state for `/readyz` and the pipeline status.

use serde::Serialize;
use tokio_postgres::{Client, Error};

/// One policy job as TimescaleDB reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// `policy_compression raw_metrics`, `policy_refresh_continuous_aggregate downsampled_metrics_1h`, ...
    pub job: String,
    /// TimescaleDB's job id.
    pub job_id: i32,
    /// `Success`, `Failed`, or none before the first run.
    pub last_run_status: Option<String>,
    /// Failed runs so far.
    pub total_failures: i64,
    /// Seconds since the last successful run; none before any.
    pub last_success_age_seconds: Option<f64>,
    /// The newest error TimescaleDB recorded for the job.
    pub last_error: Option<String>,
}

impl Job {
    /// Whether the job's last run failed.
    pub fn failing(&self) -> bool {
        self.last_run_status.as_deref() == Some("Failed")
    }
}

/// The policy jobs on Plantlink's tables, named by the table or view they serve.
pub async fn read(c: &Client) -> Result<Vec<Job>, Error> {
    let rows = c
        .query(
            "SELECT j.proc_name || ' ' || coalesce(ca.view_name::text, j.hypertable_name::text, ''),
                    j.job_id, s.last_run_status, coalesce(s.total_failures, 0),
                    -- -infinity until the first success
                    CASE WHEN isfinite(s.last_successful_finish)
                         THEN extract(epoch FROM now() - s.last_successful_finish)::float8 END,
                    (SELECT e.err_message FROM timescaledb_information.job_errors e
                     WHERE e.job_id = j.job_id ORDER BY e.finish_time DESC NULLS LAST LIMIT 1)
             FROM timescaledb_information.jobs j
             LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
             LEFT JOIN timescaledb_information.continuous_aggregates ca
                    ON ca.materialization_hypertable_name = j.hypertable_name
             WHERE j.proc_name LIKE 'policy_%'
             ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Job {
            job: r.get(0),
            job_id: r.get(1),
            last_run_status: r.get(2),
            total_failures: r.get(3),
            last_success_age_seconds: r.get(4),
            last_error: r.get(5),
        })
        .collect())
}

/// Exports `jobs` as metrics and warns about each whose failures grew since `before`.
pub fn report(jobs: &[Job], before: &[Job]) {
    for j in jobs {
        metrics::counter!("plantlink_cloud_timescale_job_failures_total", "job" => j.job.clone())
            .absolute(j.total_failures.max(0) as u64);
        metrics::gauge!("plantlink_cloud_timescale_job_last_success_age_seconds", "job" => j.job.clone())
            .set(j.last_success_age_seconds.unwrap_or(-1.0));
        let was = before
            .iter()
            .find(|b| b.job_id == j.job_id)
            .map_or(0, |b| b.total_failures);
        if j.total_failures > was {
            tracing::warn!(
                job = %j.job, job_id = j.job_id, failures = j.total_failures,
                error = j.last_error.as_deref().unwrap_or("(no error recorded)"),
                "a TimescaleDB policy job failed; until it succeeds its rollups, compression or \
                 retention do not advance (see timescaledb_information.job_errors)"
            );
        }
    }
}
