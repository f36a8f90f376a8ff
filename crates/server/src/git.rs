//! `POST /v1/sandboxes/{name}/git/checkout`: the runtime's `git_checkout`
//! (Cloudflare's `gitCheckout`), a repository cloned into the workspace by
//! `git` in the sandbox's container, through its egress proxy.
//!
//! Credentials never come with the request: a private repository is reached
//! through a header rule of the sandbox's network policy, which the proxy
//! applies (`PUT /v1/sandboxes/{name}/network`).
//!
//! Three kinds of answer:
//! - **`422 invalid-request`**: the body is JSON of the right shape but the
//!   checkout is refused before anything runs (credentials in the URL, a
//!   scheme other than `http`/`https`, a branch, directory, depth or timeout
//!   out of range). Malformed JSON or an unknown field is `400`, as on every
//!   route.
//! - **`200`** when git ran, whatever it said: `exit_code` is git's, and on
//!   failure (an unknown branch, a `401` from the server, a host the policy
//!   denies) `stderr` carries git's own words and `commit` is `null`. This is
//!   how `exec` answers a command that fails: the request was carried out, and
//!   the client needs git's message, which a `502`/`409` problem would have to
//!   squeeze into its `detail`. It also keeps the server from guessing which
//!   of git's failures are the remote's fault and which the caller's.
//! - Any other problem as `exec` has them (`404` for no such sandbox or
//!   another tenant's, `409` when the sandbox may not use containers).

use std::time::Duration;

use airlock_core::limits::MAX_DEADLINE;
use airlock_runtime::GitCheckout;
use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::exec::ExecAnswer;
use crate::{ApiError, Code, StrictJson};

/// `POST /v1/sandboxes/{name}/git/checkout`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GitCheckoutBody {
    /// An `http://` or `https://` URL, without credentials (a private
    /// repository's token comes from a header rule of the network policy).
    url: String,
    /// A branch or tag; the remote's default branch when absent.
    branch: Option<String>,
    /// A shallow clone of this many commits; the whole history when absent.
    #[schema(minimum = 1)]
    depth: Option<u32>,
    /// The directory under `/workspace`; the repository's name when absent.
    dir: Option<String>,
    /// Deadline in seconds (fractions allowed); default 300.
    timeout: Option<f64>,
}

/// The answer: where the repository is, its commit, and git's own run (the
/// fields of an exec answer).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GitCheckoutAnswer {
    /// The repository's directory, relative to `/workspace`.
    dir: String,
    /// The checked-out commit (`HEAD`); `null` when the clone failed.
    commit: Option<String>,
    #[serde(flatten)]
    run: ExecAnswer,
}

/// `422 invalid-request`: a checkout refused before anything ran.
fn refused(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidRequest, detail)
}

impl GitCheckoutBody {
    /// The runtime's checkout, every field checked (nothing has run yet).
    fn into_checkout(self) -> Result<GitCheckout, ApiError> {
        let timeout = match self.timeout {
            None => None,
            Some(seconds) => Some(
                Duration::try_from_secs_f64(seconds).ok().filter(|d| !d.is_zero() && *d <= MAX_DEADLINE).ok_or_else(
                    || refused(format!("timeout must be over 0 and at most {} seconds", MAX_DEADLINE.as_secs())),
                )?,
            ),
        };
        let checkout = GitCheckout { url: self.url, branch: self.branch, depth: self.depth, dir: self.dir, timeout };
        match checkout.validate() {
            Ok(_) => Ok(checkout),
            // The runtime's words name the field and the rule, nothing of the host.
            Err(error @ airlock_runtime::Error::Invalid { .. }) => Err(refused(error.to_string())),
            Err(other) => Err(other.into()),
        }
    }
}

pub(crate) async fn checkout(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<GitCheckoutBody>,
) -> Result<Json<GitCheckoutAnswer>, ApiError> {
    let sandbox = state.sandbox(&name)?;
    let checkout = body.into_checkout()?;
    // git runs in the container, which takes no evaluation slot (as exec's
    // container commands do not).
    let outcome = sandbox.git_checkout(&checkout).await?;
    Ok(Json(GitCheckoutAnswer { dir: outcome.dir, commit: outcome.commit, run: ExecAnswer::new(outcome.run, true) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> GitCheckoutBody {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_valid_body_becomes_the_runtime_checkout() {
        let checkout = body(serde_json::json!({
            "url": "https://git.test/org/tool.git", "branch": "main", "depth": 1, "dir": "src/tool", "timeout": 2.5
        }))
        .into_checkout()
        .unwrap();
        assert_eq!(checkout.url, "https://git.test/org/tool.git");
        assert_eq!(checkout.branch.as_deref(), Some("main"));
        assert_eq!(checkout.depth, Some(1));
        assert_eq!(checkout.dir.as_deref(), Some("src/tool"));
        assert_eq!(checkout.timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn refusals_are_422_and_unknown_fields_do_not_parse() {
        for json in [
            serde_json::json!({ "url": "https://user:tok@git.test/a/b.git" }),
            serde_json::json!({ "url": "ssh://git.test/a/b.git" }),
            serde_json::json!({ "url": "https://git.test/a/b.git", "branch": "--upload-pack=x" }),
            serde_json::json!({ "url": "https://git.test/a/b.git", "dir": "../out" }),
            serde_json::json!({ "url": "https://git.test/a/b.git", "depth": 0 }),
            serde_json::json!({ "url": "https://git.test/a/b.git", "timeout": 0 }),
            serde_json::json!({ "url": "https://git.test/a/b.git", "timeout": 1e12 }),
        ] {
            let error = body(json.clone()).into_checkout().unwrap_err();
            assert_eq!((error.status, error.code), (StatusCode::UNPROCESSABLE_ENTITY, Code::InvalidRequest), "{json}");
        }
        let unknown =
            serde_json::from_value::<GitCheckoutBody>(serde_json::json!({ "url": "https://g.test/a", "token": "x" }));
        assert!(unknown.is_err());
    }

    #[test]
    fn the_documented_answer_carries_the_exec_fields() {
        let document = serde_json::to_value(crate::openapi::openapi()).unwrap();
        let answer = document["components"]["schemas"]["GitCheckoutAnswer"].to_string();
        // The exec fields by reference to exec's own answer (`allOf`).
        for field in ["\"dir\"", "\"commit\"", "#/components/schemas/ExecAnswer"] {
            assert!(answer.contains(field), "{field} missing: {answer}");
        }
        let body = &document["components"]["schemas"]["GitCheckoutBody"];
        assert_eq!(body["additionalProperties"], serde_json::json!(false), "{body}");
    }
}
