//! `/healthz` (the process answers) and `/readyz` (the database answers too); neither needs
//! a token.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, App, storage};
use crate::postgres::queries;

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let check = async {
        let c = app.db.get().await?;
        queries::ping(&c).await.map_err(storage)
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer within 2 s".into(),
        )),
    }
}
