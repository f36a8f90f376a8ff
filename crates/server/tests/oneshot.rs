//! `app(state)` driven with `oneshot`, no socket: strict bodies and problems.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use airlock_runtime::{DiskOptions, QuotaMode, Runtime, RuntimeOptions};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

#[tokio::test]
async fn unknown_fields_and_routes_are_problems_and_make_nothing() {
    let home = tempfile::tempdir().unwrap();
    let mut options = RuntimeOptions::new(home.path());
    options.disk = DiskOptions { quotas: QuotaMode::Off, ..DiskOptions::default() };
    let runtime = Runtime::open(options).await.unwrap();
    let app = airlock_server::app(airlock_server::AppState::new(runtime.clone()));
    let token = runtime.tokens().create("oneshot", true).unwrap();

    let request = Request::post("/v1/sandboxes")
        .header("authorization", format!("Bearer {}", token.secret()))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"name":"one","extra":true}"#))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["content-type"], airlock_server::PROBLEM_JSON);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["code"], "invalid-request");
    assert!(runtime.list().unwrap().is_empty(), "nothing was created");

    let response = app.oneshot(Request::get("/v2/anything").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()["content-type"], airlock_server::PROBLEM_JSON);
}
