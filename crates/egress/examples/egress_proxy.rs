//! Runs one sandbox's egress proxy by hand, to try real clients against it.
//!
//! `cargo run -p airlock-egress --example egress_proxy -- DIR 'POLICY_JSON' [EXTRA_ROOT_PEM]`
//!
//! Binds `DIR/proxy.sock` and writes `DIR/ca-bundle.pem` (the CA lives in
//! `DIR/ca`). A rule's secret `NAME` is read from the environment variable
//! `EGRESS_SECRET_NAME` (upper case, `-` and `.` as `_`). Decisions are printed
//! to stderr. The socket speaks HTTP; bridge it to TCP to point `curl -x` at it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // an example may

use std::path::PathBuf;
use std::sync::Arc;

use airlock_core::network::NetworkPolicy;
use airlock_egress::{Decision, DecisionSink, Egress, EgressCa, EgressConfig, SecretSource};

struct EnvSecrets;

impl SecretSource for EnvSecrets {
    fn secret(&self, name: &str) -> Option<String> {
        let variable = format!("EGRESS_SECRET_{}", name.to_ascii_uppercase().replace(['-', '.'], "_"));
        std::env::var(variable).ok()
    }
}

struct Print;

impl DecisionSink for Print {
    fn record(&self, decision: Decision) {
        eprintln!("{decision:?}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: DIR POLICY_JSON [EXTRA_ROOT_PEM]"))?);
    let policy: NetworkPolicy = serde_json::from_str(&args.next().unwrap_or_else(|| "{}".to_owned()))?;
    policy.validate()?;
    let mut config = EgressConfig::default();
    if let Some(path) = args.next() {
        config.extra_upstream_roots_pem.push(std::fs::read_to_string(path)?);
    }
    let ca = EgressCa::load_or_create(&dir.join("ca"))?;
    let egress = Egress::new(config, ca, Arc::new(EnvSecrets), Arc::new(Print))?;
    let (_policy, receiver) = tokio::sync::watch::channel(Arc::new(policy));
    let handle = egress.bind_sandbox("example".to_owned(), &dir, receiver)?;
    eprintln!("listening on {} (trust bundle {})", handle.socket_path().display(), handle.ca_bundle_path().display());
    tokio::signal::ctrl_c().await?;
    handle.shutdown();
    Ok(())
}
