//! The isolates' outbound HTTP hook: every `wasi:http` request of an isolate
//! run in a sandbox goes through the runtime's [`Egress`] under the policy
//! in force for that sandbox when the request is made (so a policy changed
//! between two evaluations applies to the second), with the same header
//! rules (credentials the guest never sees), internal-address refusals and
//! decision records as the containers' proxy.

use std::sync::Arc;

use airlock_core::NetworkPolicy;
use airlock_egress::Egress;
use airlock_wasm::{Outbound, OutboundBody, OutboundFuture, OutboundHttp, OutboundRefused};
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::sandbox::Sandbox;

/// One sandbox's hook: its id (for decision records) and its policy watch.
struct SandboxOutbound {
    egress: Egress,
    sandbox: String,
    policy: watch::Receiver<Arc<NetworkPolicy>>,
}

impl std::fmt::Debug for SandboxOutbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxOutbound").field("sandbox", &self.sandbox).finish_non_exhaustive()
    }
}

impl OutboundHttp for SandboxOutbound {
    fn send(&self, request: http::Request<OutboundBody>) -> OutboundFuture {
        // The policy in force now, not the one when the isolate started.
        let policy = self.policy.borrow().clone();
        let egress = self.egress.clone();
        let sandbox = self.sandbox.clone();
        Box::pin(async move {
            match egress.send_request(&sandbox, &policy, request).await {
                Ok(response) => Ok(response.map(|body| body.boxed_unsync())),
                // The text names the host and the policy's reason, never a secret.
                Err(error) => Err(OutboundRefused(error.to_string())),
            }
        })
    }
}

impl Sandbox {
    /// The hook an isolate run in this sandbox sends its HTTP requests through.
    pub(crate) fn outbound(&self) -> Outbound {
        Outbound::new(Arc::new(SandboxOutbound {
            egress: self.runtime.inner.egress.clone(),
            sandbox: self.inner.id.to_string(),
            policy: self.network_policy_watch(),
        }))
    }
}
