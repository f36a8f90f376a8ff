//! One run of a guest: a fresh store, the WASI context built from the request,
//! the limits armed, the outcome classified.

use std::time::Instant;

use airlock_core::{
    Error, ExecOutcome, ExecRequest, Limit, LimitExceeded, Limits, OutputStream, StdinSource, Termination, TierKind,
    WORKSPACE_GUEST_PATH, Workspace,
};
use bytes::Bytes;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::engine::{IsolateEngine, WASM_STACK_BYTES};
use crate::guest::{Guest, GuestKind};
use crate::host::{ComponentHost, HasLimiter, Limiter, ModuleHost, is_table_full, p1_context};
use crate::outbound::Outbound;
use crate::metering::Metered;
use crate::output::{CapturePipe, OutputCapHit};

/// Why a run ended, before it is turned into a [`Termination`].
pub(crate) enum Ended {
    /// The guest ran to the end (or called exit).
    Finished(wasmtime::Result<i32>),
    /// Instantiation failed.
    NotStarted(wasmtime::Error),
    /// The deadline passed while the guest was blocked in a host call.
    DeadlinePassed,
}

impl IsolateEngine {
    /// Runs `guest` once against `workspace`: the workspace is the guest's only
    /// preopen, at `/workspace`; args, env and stdin are exactly the request's.
    /// `request.program` only names the guest to itself (`argv[0]`).
    ///
    /// Dropping the returned future cancels the run. The guest's outbound
    /// HTTP is refused (see [`run_with_outbound`](Self::run_with_outbound)).
    pub async fn run(&self, guest: &Guest, workspace: &Workspace, request: &ExecRequest) -> Result<ExecOutcome, Error> {
        self.run_with_outbound(guest, workspace, request, None).await
    }

    /// [`run`](Self::run), with the guest's `wasi:http` requests sent
    /// through `outbound` (none: every request is refused).
    pub async fn run_with_outbound(
        &self,
        guest: &Guest,
        workspace: &Workspace,
        request: &ExecRequest,
        outbound: Option<Outbound>,
    ) -> Result<ExecOutcome, Error> {
        if guest.is_interpreter() {
            return Err(Error::Unsupported {
                tier: TierKind::Isolate,
                what: format!(
                    "running the interpreter {} as a command (evaluate code in a context instead)",
                    guest.name()
                ),
            });
        }
        if let Some(cwd) = request.cwd.as_deref().filter(|cwd| cwd.trim_end_matches('/') != WORKSPACE_GUEST_PATH) {
            return Err(Error::Unsupported {
                tier: TierKind::Isolate,
                what: format!("working directory {cwd:?} (isolates run in {WORKSPACE_GUEST_PATH})"),
            });
        }
        let limits = request.limits;
        limits.validate()?;
        let started = Instant::now();
        let deadline = started + limits.deadline;

        let stdout = CapturePipe::new(OutputStream::Stdout, limits.output_bytes, request.output.clone());
        let stderr = CapturePipe::new(OutputStream::Stderr, limits.output_bytes, request.output.clone());
        let argv0 = if request.program.is_empty() { guest.name() } else { request.program.as_str() };
        let mut wasi = confined_wasi(workspace, &stdout, &stderr)?;
        wasi.arg(argv0).args(&request.args).envs(&request.env);
        match &request.stdin {
            StdinSource::Empty => {}
            StdinSource::Bytes(bytes) => {
                wasi.stdin(MemoryInputPipe::new(Bytes::copy_from_slice(bytes)));
            }
            StdinSource::Inherit => {
                wasi.inherit_stdin();
            }
            // A stdin source added to the vocabulary later is refused until this tier supports it.
            _ => return Err(Error::Unsupported { tier: TierKind::Isolate, what: "this stdin source".into() }),
        }
        let limiter = Limiter::new(&limits);

        let engine = &self.inner.engine;
        let metered = match guest.kind() {
            // Refused at the top of this function.
            GuestKind::Interpreter(_) => return Err(Error::Engine("an interpreter cannot run as a command".into())),
            GuestKind::Component(pre) => {
                let mut host = ComponentHost::new(wasi.build(), &limits, outbound);
                host.limiter = limiter;
                let mut store = arm(Store::new(engine, host));
                let ended = Metered::new(async {
                    let instance = match pre.instantiate_async(&mut store).await {
                        Ok(instance) => instance,
                        Err(e) => return Ended::NotStarted(e),
                    };
                    let status = instance.wasi_cli_run().call_run(&mut store).await;
                    Ended::Finished(status.map(|ok| if ok.is_ok() { 0 } else { 1 }))
                });
                let (ended, cpu) = bounded(ended, deadline).await;
                (ended, cpu, store.data().limiter.hit)
            }
            GuestKind::Module(pre) => {
                let host = ModuleHost { wasi: p1_context(&mut wasi, &limits), limiter };
                let mut store = arm(Store::new(engine, host));
                let ended = Metered::new(async {
                    let instance = match pre.instantiate_async(&mut store).await {
                        Ok(instance) => instance,
                        Err(e) => return Ended::NotStarted(e),
                    };
                    let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                        Ok(start) => start,
                        Err(e) => return Ended::NotStarted(e),
                    };
                    Ended::Finished(start.call_async(&mut store, ()).await.map(|()| 0))
                });
                let (ended, cpu) = bounded(ended, deadline).await;
                (ended, cpu, store.data().limiter.hit)
            }
        };
        let (ended, cpu_time, limiter_hit) = metered;
        let termination = classify(ended, limiter_hit, &limits)?;
        let (stdout, stdout_truncated) = stdout.take();
        let (stderr, stderr_truncated) = stderr.take();
        Ok(ExecOutcome {
            termination,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            wall_time: started.elapsed(),
            cpu_time,
            tier: TierKind::Isolate,
        })
    }
}

/// The WASI context every guest starts from: the workspace as the only
/// preopen (and the working directory), captured stdout and stderr, empty
/// stdin, and no sockets or name lookups until egress policy grants them.
pub(crate) fn confined_wasi(
    workspace: &Workspace,
    stdout: &CapturePipe,
    stderr: &CapturePipe,
) -> Result<WasiCtxBuilder, Error> {
    let mut wasi = unbound_wasi(stdout, stderr);
    wasi.preopened_dir(workspace.host_path(), WORKSPACE_GUEST_PATH, FsPerms::ReadWrite).map_err(|e| {
        Error::Workspace { path: workspace.host_path().to_path_buf(), reason: format!("cannot be opened: {e}") }
    })?;
    Ok(wasi)
}

/// A WASI context like [`confined_wasi`]'s without the workspace: no file
/// system at all. For an interpreter context made ahead of its caller.
pub(crate) fn unbound_wasi(stdout: &CapturePipe, stderr: &CapturePipe) -> WasiCtxBuilder {
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdin(MemoryInputPipe::new(Bytes::new()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .initial_cwd(WORKSPACE_GUEST_PATH);
    wasi
}

/// Sets up a store's limiter and deadline check; the deadline itself lives in
/// the limiter, so a long-lived store (a context) can restart it per evaluation.
pub(crate) fn arm<T: HasLimiter + 'static>(mut store: Store<T>) -> Store<T> {
    store.limiter(|host| host.limiter());
    // Check the clock at every epoch tick; yield to the executor between ticks so
    // many isolates share worker threads fairly and cancellation can happen.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut context| {
        let limiter = context.data_mut().limiter();
        if Instant::now() >= limiter.deadline {
            Err(wasmtime::Error::new(LimitExceeded { limit: Limit::Deadline, value: limiter.deadline_ms }))
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

/// Drives a metered run until it ends or the deadline passes; the latter
/// covers a guest blocked in a host call, where epoch checks cannot reach it.
pub(crate) async fn bounded<F: std::future::Future<Output = Ended>>(
    run: Metered<F>,
    deadline: Instant,
) -> (Ended, std::time::Duration) {
    let mut run = run;
    let metered = tokio::time::timeout_at(deadline.into(), &mut run).await;
    match metered {
        Ok((ended, cpu)) => (ended, cpu),
        Err(_) => (Ended::DeadlinePassed, run.cpu()),
    }
}

/// Finds an error of type `E` anywhere in a wasmtime error's chain.
pub(crate) fn find<E: std::error::Error + Send + Sync + 'static>(error: &wasmtime::Error) -> Option<&E> {
    error.downcast_ref::<E>().or_else(|| error.chain().find_map(|cause| cause.downcast_ref::<E>()))
}

/// Turns how a run ended into a [`Termination`]; `Err` only for failures of the
/// host (the engine could not start the guest for reasons not the guest's).
pub(crate) fn classify(
    ended: Ended,
    limiter_hit: Option<LimitExceeded>,
    limits: &Limits,
) -> Result<Termination, Error> {
    let deadline_ms = u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX);
    let limit = |limit: Limit, value: u64| Ok(Termination::LimitExceeded(LimitExceeded { limit, value }));
    let error = match ended {
        Ended::DeadlinePassed => return limit(Limit::Deadline, deadline_ms),
        Ended::Finished(Ok(code)) => return Ok(Termination::Exited { code }),
        Ended::Finished(Err(e)) | Ended::NotStarted(e) if limiter_hit.is_some() => {
            // The limiter refused a grow and the guest trapped on it: report the limit, not the trap.
            tracing::debug!("run stopped by the limiter: {e:#}");
            return Ok(
                limiter_hit.map_or(Termination::Crashed { message: format!("{e:#}") }, Termination::LimitExceeded)
            );
        }
        Ended::NotStarted(e) => {
            // The per-run instance cap is enforced by Wasmtime's store, which
            // reports it only as text; the pool's own capacity errors stay host errors.
            let text = format!("{e:#}");
            if text.contains("resource limit exceeded: instance count") {
                return limit(Limit::Instances, limits.instances);
            }
            if let Some(hit) = find::<LimitExceeded>(&e) {
                return Ok(Termination::LimitExceeded(*hit));
            }
            return Err(Error::Engine(format!("cannot instantiate the guest: {text}")));
        }
        Ended::Finished(Err(e)) => e,
    };
    if let Some(exit) = find::<I32Exit>(&error) {
        return Ok(Termination::Exited { code: exit.0 });
    }
    if let Some(hit) = find::<LimitExceeded>(&error) {
        return Ok(Termination::LimitExceeded(*hit));
    }
    if find::<OutputCapHit>(&error).is_some() {
        return limit(Limit::Output, limits.output_bytes);
    }
    if is_table_full(&error) {
        // A handle past the cap that the guest could not be answered with an
        // error code for (a stream, a pollable, any open in preview 1).
        return limit(Limit::Handles, limits.handles);
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::StackOverflow => limit(Limit::Stack, WASM_STACK_BYTES as u64),
            Trap::Interrupt => limit(Limit::Deadline, deadline_ms),
            other => Ok(Termination::Crashed { message: other.to_string() }),
        };
    }
    Ok(Termination::Crashed { message: format!("{error:#}") })
}
