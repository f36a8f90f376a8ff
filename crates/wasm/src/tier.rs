//! The isolate tier behind the [`Tier`] seam.

use airlock_core::{BoxFuture, Error, ExecOutcome, ExecRequest, Tier, TierKind, Workspace};

use crate::IsolateEngine;

/// Runs requests whose `program` is the host path of a `.wasm` or `.wat` guest.
#[derive(Debug, Clone)]
pub struct IsolateTier {
    engine: IsolateEngine,
}

impl IsolateTier {
    pub fn new(engine: IsolateEngine) -> Self {
        Self { engine }
    }

    pub fn engine(&self) -> &IsolateEngine {
        &self.engine
    }
}

impl Tier for IsolateTier {
    fn kind(&self) -> TierKind {
        TierKind::Isolate
    }

    fn exec<'a>(&'a self, workspace: &'a Workspace, request: ExecRequest) -> BoxFuture<'a, Result<ExecOutcome, Error>> {
        Box::pin(async move {
            let engine = self.engine.clone();
            let path = request.program.clone();
            // Loading may compile, which is CPU-bound for seconds: keep it off the async workers.
            let guest = tokio::task::spawn_blocking(move || engine.load_file(path))
                .await
                .map_err(|e| Error::Engine(format!("guest loading stopped: {e}")))??;
            let mut request = request;
            if let Some(name) = std::path::Path::new(&request.program).file_stem() {
                request.program = name.to_string_lossy().into_owned();
            }
            self.engine.run(&guest, workspace, &request).await
        })
    }
}
