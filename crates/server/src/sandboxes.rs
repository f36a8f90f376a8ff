//! `/v1/sandboxes`: create, list, look at and destroy sandboxes by name, each
//! as the caller may see them (see [`crate::auth`]).

use airlock_runtime::{SandboxConfig, SandboxInfo};
use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use serde::Deserialize;

use crate::auth::Scope;
use crate::{ApiError, Code, StrictJson};

/// `POST /v1/sandboxes`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSandbox {
    name: String,
    /// Every field has a default; unknown fields are refused here too.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    config: Option<SandboxConfig>,
}

/// Makes the sandbox, owned by the caller's token. Names are one namespace
/// per home: a name anyone holds is answered with one generic `409`, the same
/// whether the caller's own sandbox or another tenant's has it, so it says
/// that the name is taken and nothing of by whom or of that sandbox.
pub(crate) async fn create(
    state: Scope,
    StrictJson(request): StrictJson<CreateSandbox>,
) -> Result<(StatusCode, Json<SandboxInfo>), ApiError> {
    let config = request.config.unwrap_or_default();
    // Checked before the name is looked up: the answer to a bad config does
    // not depend on whether the name is taken.
    config.validate()?;
    crate::network::check_tenant_policy(state.caller(), &config.policy.network)?;
    match state.runtime().create_sandbox(&request.name, config, state.caller().owner()).await? {
        Some(sandbox) => Ok((StatusCode::CREATED, Json(sandbox.info()))),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            Code::Conflict,
            format!("the sandbox name {:?} is not available", request.name),
        )),
    }
}

/// The caller's sandboxes (every sandbox for an admin).
pub(crate) async fn list(state: Scope) -> Result<Json<Vec<SandboxInfo>>, ApiError> {
    let mut sandboxes = state.runtime().list()?;
    sandboxes.retain(|sandbox| state.sees(sandbox));
    Ok(Json(sandboxes))
}

pub(crate) async fn info(state: Scope, Path(name): Path<String>) -> Result<Json<SandboxInfo>, ApiError> {
    Ok(Json(state.sandbox(&name)?.info()))
}

pub(crate) async fn destroy(state: Scope, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let sandbox = state.sandbox(&name)?;
    state.runtime().destroy_sandbox(&sandbox).await?;
    Ok(StatusCode::NO_CONTENT)
}
