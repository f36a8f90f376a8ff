//! The container tier behind the [`Tier`] seam: one sandbox container per
//! workspace, created on first use, so a request escalated from the isolate
//! tier runs against the same files.

use std::collections::HashMap;
use std::path::PathBuf;

use airlock_core::{BoxFuture, ExecOutcome, ExecRequest, Tier, TierKind, Workspace};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::engine::{ContainerRuntime, DockerEngine};
use crate::error::Result;
use crate::sandbox::ContainerSandbox;
use crate::spec::{ContainerResources, SandboxSpec};

/// What every container of one [`ContainerTier`] is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerTemplate {
    pub image: String,
    pub runtime: ContainerRuntime,
    pub resources: ContainerResources,
}

/// Runs requests in containers of one template (image, runtime, resources).
#[derive(Debug)]
pub struct ContainerTier {
    engine: DockerEngine,
    template: ContainerTemplate,
    sandboxes: Mutex<HashMap<PathBuf, ContainerSandbox>>,
}

impl ContainerTier {
    pub fn new(engine: DockerEngine, template: ContainerTemplate) -> Self {
        Self { engine, template, sandboxes: Mutex::new(HashMap::new()) }
    }

    /// The running sandbox for `workspace`, created and started on first use.
    pub async fn sandbox_for(&self, workspace: &Workspace) -> Result<ContainerSandbox> {
        let path = workspace.host_path().to_path_buf();
        let mut sandboxes = self.sandboxes.lock().await;
        if let Some(sandbox) = sandboxes.get(&path) {
            return Ok(sandbox.clone());
        }
        // A stable id per workspace path: the engine refuses a second container of the same name.
        let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
        let id: String = digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect();
        let spec = SandboxSpec::new(format!("ws-{id}"), &self.template.image, &path)
            .runtime(self.template.runtime)
            .resources(self.template.resources);
        let sandbox = ContainerSandbox::create_started(&self.engine, spec).await?;
        sandboxes.insert(path, sandbox.clone());
        Ok(sandbox)
    }

    /// Removes every container this tier created; workspaces stay.
    pub async fn shutdown(&self) -> Result<()> {
        let sandboxes: Vec<ContainerSandbox> = self.sandboxes.lock().await.drain().map(|(_, s)| s).collect();
        for sandbox in sandboxes {
            sandbox.remove().await?;
        }
        Ok(())
    }
}

impl Tier for ContainerTier {
    fn kind(&self) -> TierKind {
        TierKind::Container
    }

    fn exec<'a>(
        &'a self,
        workspace: &'a Workspace,
        request: ExecRequest,
    ) -> BoxFuture<'a, airlock_core::Result<ExecOutcome>> {
        Box::pin(async move {
            let sandbox = self.sandbox_for(workspace).await?;
            Ok(sandbox.exec(request).await?)
        })
    }
}
