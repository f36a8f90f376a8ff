//! `/v1/sandboxes`: create, list, look at and destroy sandboxes by name.

use airlock_runtime::{SandboxConfig, SandboxInfo};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use crate::{ApiError, AppState, Code, StrictJson};

/// `POST /v1/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSandbox {
    name: String,
    /// Every field has a default; unknown fields are refused here too.
    #[serde(default)]
    config: Option<SandboxConfig>,
}

pub(crate) async fn create(
    State(state): State<AppState>,
    StrictJson(request): StrictJson<CreateSandbox>,
) -> Result<(StatusCode, Json<SandboxInfo>), ApiError> {
    let runtime = state.runtime();
    if runtime.get(&request.name)?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            Code::Conflict,
            format!("a sandbox named {:?} exists already", request.name),
        ));
    }
    let config = request.config.unwrap_or_default();
    config.validate()?;
    let sandbox = runtime.sandbox_with(&request.name, config).await?;
    Ok((StatusCode::CREATED, Json(sandbox.info())))
}

pub(crate) async fn list(State(state): State<AppState>) -> Result<Json<Vec<SandboxInfo>>, ApiError> {
    Ok(Json(state.runtime().list()?))
}

pub(crate) async fn info(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(state.sandbox(&name)?.info()))
}

pub(crate) async fn destroy(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    state.runtime().destroy(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
