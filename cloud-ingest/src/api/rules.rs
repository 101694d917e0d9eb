//! Alert rules: `/v1/alert-rules` (list, create) and `/v1/alert-rules/{id}` (read, replace,
//! delete), each the token's tenant's only.
//!
//! A rule is stored whole as JSON, with its name, metric, threshold, window and severity in
//! columns beside it. A changed or deleted rule starts over: its open alerts are closed
//! (resolved, with no resolving window), so none stays open forever and a new firing is a
//! new alert. Every change reaches the alerting service at once.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio_postgres::Client;

use super::tenant::Tenant;
use super::{ApiError, App};
use crate::alerting::rule::{RuleBody, Window};
use crate::postgres::queries::{self, RuleRow};

impl App {
    fn rules_changed(&self) {
        if let Some(a) = &self.alerts {
            a.rules_changed();
        }
    }
}

/// A rule body from JSON; a 400 names the field that is wrong.
fn rule_body(bytes: &[u8], tenant: &str) -> Result<RuleBody, ApiError> {
    let body: RuleBody = super::json_body(bytes)?;
    body.to_rule(0, tenant)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(body)
}

fn rule_json(id: i64, mut body: RuleBody) -> Value {
    body.id = Some(id);
    serde_json::to_value(body).unwrap_or(Value::Null)
}

fn rule_not_found(id: i64) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("alert rule {id} not found for this tenant"),
    )
}

/// The window of a threshold rule, or the silence of an absence rule, in seconds.
fn window_seconds(b: &RuleBody) -> Option<i32> {
    match (b.window, b.seconds) {
        (Some(Window::Tumbling { seconds } | Window::Sliding { seconds, .. }), _) => {
            i32::try_from(seconds).ok()
        }
        (None, Some(s)) => i32::try_from(s).ok(),
        (None, None) => None,
    }
}

/// The columns of `rule`, whose whole JSON is `body_json`.
fn row<'a>(rule: &'a RuleBody, body_json: &'a str) -> RuleRow<'a> {
    RuleRow {
        name: &rule.name,
        metric: rule.metric.as_deref(),
        body_json,
        threshold: rule.threshold,
        window_seconds: window_seconds(rule),
        severity: &rule.severity,
        description: rule.description.as_deref(),
    }
}

/// The rule in a request body, without an id of its own, and its JSON.
fn new_rule(body: &[u8], tenant: &str) -> Result<(RuleBody, String), ApiError> {
    let mut rule = rule_body(body, tenant)?;
    rule.id = None;
    let json = serde_json::to_string(&rule).unwrap_or_default();
    Ok((rule, json))
}

pub(super) async fn create(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (rule, json) = new_rule(&body, &tenant)?;
    let c = app.db.get().await?;
    let id = queries::insert_rule(&c, &tenant, &row(&rule, &json))
        .await
        .map_err(|e| app.storage(e))?;
    app.rules_changed();
    Ok((StatusCode::CREATED, Json(rule_json(id, rule))))
}

pub(super) async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let rows = queries::rules(&c, &tenant)
        .await
        .map_err(|e| app.storage(e))?;
    let rules: Vec<Value> = rows
        .into_iter()
        .filter_map(|(id, body)| Some(rule_json(id, serde_json::from_str(&body).ok()?)))
        .collect();
    Ok(Json(json!({ "rules": rules })))
}

pub(super) async fn get(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let stored = queries::rule(&c, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
        .ok_or_else(|| rule_not_found(id))?;
    let body: RuleBody = serde_json::from_str(&stored).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored rule {id}: {e}"),
        )
    })?;
    Ok(Json(rule_json(id, body)))
}

pub(super) async fn update(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (rule, json) = new_rule(&body, &tenant)?;
    let c = app.db.get().await?;
    if !queries::update_rule(&c, &tenant, id, &row(&rule, &json))
        .await
        .map_err(|e| app.storage(e))?
    {
        return Err(rule_not_found(id));
    }
    start_over(&app, &c, &tenant, id).await?;
    Ok(Json(rule_json(id, rule)))
}

pub(super) async fn delete(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let c = app.db.get().await?;
    if !queries::delete_rule(&c, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
    {
        return Err(rule_not_found(id));
    }
    start_over(&app, &c, &tenant, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// After a change: the rule's open alerts are closed, and alerting hears of it.
async fn start_over(app: &App, c: &Client, tenant: &str, id: i64) -> Result<(), ApiError> {
    queries::close_alerts_of(c, tenant, id)
        .await
        .map_err(|e| app.storage(e))?;
    app.rules_changed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> String {
        let e = rule_body(body.as_bytes(), "acme").unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        e.1
    }

    #[test]
    fn a_bad_rule_body_names_the_field() {
        assert!(
            refused("[]").starts_with("field body: "),
            "{}",
            refused("[]")
        );
        let wrong = r#"{"name": "hot", "metric": "t", "threshold": "hot", "severity": "info"}"#;
        assert!(
            refused(wrong).starts_with("field threshold: "),
            "{}",
            refused(wrong)
        );
    }

    #[test]
    fn the_window_column_is_the_window_or_the_silence() {
        let mut b: RuleBody =
            serde_json::from_str(r#"{"name": "n", "severity": "info", "seconds": 600}"#).unwrap();
        assert_eq!(window_seconds(&b), Some(600));
        b.seconds = None;
        assert_eq!(window_seconds(&b), None);
        b.window = Some(Window::Tumbling { seconds: 60 });
        b.seconds = Some(600);
        assert_eq!(window_seconds(&b), Some(60));
    }
}
