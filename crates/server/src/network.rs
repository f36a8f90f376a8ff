//! A sandbox's network policy, and the runtime's secret store.
//!
//! `GET|PUT /v1/sandboxes/{name}/network`: the policy as JSON (see
//! `docs/API.md`). A body that is JSON but not a valid policy (an unknown
//! field, a bad host pattern, port 0, too many rules, a secret that does not
//! exist) is `422` with the code `invalid-policy`, and nothing changes. A
//! change applies to the sandbox's next request.
//!
//! Secrets are the runtime's, not a tenant's: `PUT /v1/secrets/{name}`,
//! `GET /v1/secrets` (names and times, never values) and `DELETE
//! /v1/secrets/{name}` need an admin token. For the same reason only an admin
//! may set a policy that names a secret (`403` for a tenant): a header rule
//! sends the secret's value to the host it names, so a tenant that could
//! write one could send any secret to a host of its own. Nor may a tenant
//! name an address (an IP-literal host, `connect_to`): that is what lets the
//! proxy dial loopback, private networks and the metadata service.

use std::time::{SystemTime, UNIX_EPOCH};

use airlock_runtime::{NetworkPolicy, SecretInfo};
use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, RequireAdmin, Scope};
use crate::{ApiError, AppState, Code, StrictJson};

/// Routes under `/v1` (behind the bearer token).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes/{name}/network", get(get_policy).put(put_policy))
        .route("/secrets", get(list_secrets))
        .route("/secrets/{name}", put(put_secret).delete(delete_secret))
}

/// `422 invalid-policy`: a policy (or the JSON meant as one) that is refused.
fn invalid_policy(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidPolicy, detail)
}

/// What only an admin may put in a policy (see the module's comment): a
/// header rule (it sends a secret's value to the host it names), and an
/// address (an IP-literal host or `connect_to`), since naming an address is
/// what lets the proxy dial loopback, the host's private networks or the
/// metadata service, which it otherwise refuses. `403` for a tenant.
pub(crate) fn check_tenant_policy(caller: &Caller, policy: &NetworkPolicy) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    let refuse = |what: String| {
        Err(ApiError::new(StatusCode::FORBIDDEN, Code::Forbidden, format!("only an admin token may set {what}")))
    };
    if let Some(secret) = policy.secret_names().next() {
        return refuse(format!("a policy that names a secret (this one names {secret:?})"));
    }
    for rule in &policy.allow {
        if rule.connect_to.is_some() {
            return refuse(format!("a rule with connect_to (the rule for {})", rule.host));
        }
        if rule.host.address().is_some() {
            return refuse(format!("a rule for an IP address ({})", rule.host));
        }
    }
    Ok(())
}

pub(crate) async fn get_policy(state: Scope, Path(name): Path<String>) -> Result<Json<NetworkPolicy>, ApiError> {
    Ok(Json(state.sandbox(&name)?.network_policy()))
}

pub(crate) async fn put_policy(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<serde_json::Value>,
) -> Result<Json<NetworkPolicy>, ApiError> {
    let sandbox = state.sandbox(&name)?;
    // Parsed here rather than by the extractor: a body that is JSON but not a
    // policy is a 422 that says why (serde's message names the field).
    let policy: NetworkPolicy = serde_json::from_value(body).map_err(|error| invalid_policy(error.to_string()))?;
    check_tenant_policy(state.caller(), &policy)?;
    sandbox.set_network_policy(policy)?;
    Ok(Json(sandbox.network_policy()))
}

/// `PUT /v1/secrets/{name}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretBody {
    /// The secret's value: one header value (at most 8 KiB, no control
    /// characters). Never shown again by any route.
    value: String,
}

/// A secret as listed: never its value.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SecretView {
    name: String,
    /// When it was first stored, in milliseconds since the Unix epoch.
    created_at_ms: u64,
    /// When its value last changed, in milliseconds since the Unix epoch.
    updated_at_ms: u64,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

impl From<SecretInfo> for SecretView {
    fn from(info: SecretInfo) -> Self {
        Self { created_at_ms: unix_ms(info.created_at), updated_at_ms: unix_ms(info.updated_at), name: info.name }
    }
}

pub(crate) async fn put_secret(
    RequireAdmin(_): RequireAdmin,
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<SecretBody>,
) -> Result<StatusCode, ApiError> {
    state.runtime().set_secret(&name, &body.value)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn list_secrets(
    RequireAdmin(_): RequireAdmin,
    state: Scope,
) -> Result<Json<Vec<SecretView>>, ApiError> {
    Ok(Json(state.runtime().list_secrets()?.into_iter().map(SecretView::from).collect()))
}

pub(crate) async fn delete_secret(
    RequireAdmin(_): RequireAdmin,
    state: Scope,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.runtime().remove_secret(&name)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no secret named {name:?}")))
    }
}

// What the OpenAPI document says of the policy's types (core carries no
// OpenAPI dependency): the same fields, names and defaults.

/// A sandbox's outbound network policy. Deny-all when empty; a denied host
/// always wins over an allowed one.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NetworkPolicy)]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) struct NetworkPolicyDoc {
    /// Hosts that may be reached; the first rule matching host and port applies (at most 256).
    #[serde(default)]
    allow: Vec<HostRuleDoc>,
    /// Host patterns that may never be reached, whatever `allow` says (at most 256).
    #[serde(default)]
    deny: Vec<HostPatternDoc>,
}

/// A host pattern: an exact DNS name (`pypi.org`), a suffix (`*.github.com`:
/// names below it, not `github.com` itself), an IP address, or `*` for every
/// name (at most 255 characters). Matched case-insensitively, without a
/// trailing dot.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = HostPattern, example = "*.github.com")]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) struct HostPatternDoc(String);

/// An allowed host, and how it may be reached.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HostRule)]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) struct HostRuleDoc {
    host: HostPatternDoc,
    /// Ports allowed (at most 64); none means 80 and 443.
    #[serde(default)]
    #[schema(value_type = Vec<u16>, minimum = 1, maximum = 65535)]
    ports: Vec<u16>,
    /// Methods allowed, upper case (at most 16); none means any. On HTTPS,
    /// listing methods makes the proxy terminate TLS to see them.
    #[serde(default)]
    methods: Vec<String>,
    /// Headers set on every request this rule allows, from named secrets (at
    /// most 16). On HTTPS the proxy terminates TLS to set them.
    #[serde(default)]
    headers: Vec<HeaderRuleDoc>,
    /// Connect to this `address:port` instead of resolving the name (like
    /// curl's `--resolve`); naming an address is what lets a rule reach
    /// loopback or a private network.
    #[serde(default)]
    #[schema(example = "127.0.0.1:8080")]
    connect_to: Option<String>,
}

/// A header set on requests to an allowed host, its value from a secret the
/// sandbox never sees.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = HeaderRule)]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) struct HeaderRuleDoc {
    /// The header's name (`Authorization`); replaces any the sandbox sent.
    /// Framing and proxy headers (`Host`, `Content-Length`, `Proxy-*`, ...) are refused.
    #[schema(example = "Authorization")]
    name: String,
    /// The name of the secret whose value becomes the header's value (1-64 of a-z, 0-9, '-', '_', '.').
    #[schema(example = "github-token")]
    secret: String,
    /// Written before the secret's value (at most 64 printable ASCII characters).
    #[serde(default)]
    #[schema(example = "Bearer ")]
    prefix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document's types take exactly what core's types write: a policy
    /// with every field set, serialised by core, parses as the documented
    /// shape (which refuses unknown fields), and the documented example parses in core.
    #[test]
    fn the_documented_policy_shape_matches_core() {
        let full = serde_json::json!({
            "allow": [{
                "host": "*.github.com",
                "ports": [443, 8443],
                "methods": ["GET", "POST"],
                "headers": [{ "name": "Authorization", "secret": "github-token", "prefix": "Bearer " }],
                "connect_to": "127.0.0.1:8080",
            }],
            "deny": ["evil.github.com"],
        });
        let policy: NetworkPolicy = serde_json::from_value(full.clone()).unwrap();
        policy.validate().unwrap();
        let written = serde_json::to_value(&policy).unwrap();
        assert_eq!(written, full);
        let _: NetworkPolicyDoc = serde_json::from_value(written).unwrap();
        assert!(serde_json::from_value::<NetworkPolicyDoc>(serde_json::json!({ "bogus": [] })).is_err());
        let schemas = crate::openapi::openapi().components.unwrap().schemas;
        for name in ["NetworkPolicy", "HostRule", "HeaderRule", "HostPattern", "SecretBody", "SecretView"] {
            assert!(schemas.contains_key(name), "{name} is not in the document");
        }
    }
}
