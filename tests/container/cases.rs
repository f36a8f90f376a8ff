//! Every case of the container suite, parameterised by runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use airlock::container::{
    ContainerResources, ContainerRuntime, ContainerSandbox, ContainerState, ContainerTemplate, ContainerTier, Error,
    ProcessEvent, ProcessStatus, PtySize, SandboxSpec, Signal, list_labelled,
};
use airlock::{
    ExecRequest, Limit, Limits, OutputChunk, OutputSender, OutputStream, SandboxId, StdinSource, Termination, Tier,
    TierKind, Workspace,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{TestSandbox, bash, deadline, engine_and_image, exists, recorder};

pub async fn lifecycle_keeps_the_workspace_and_drops_the_rest(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    assert_eq!(test.sandbox.state().await.unwrap(), ContainerState::Running);
    let wrote = test.bash("echo kept > /workspace/kept.txt && echo layer > /home/sandbox/layer.txt").await;
    assert!(wrote.success(), "{}", wrote.stderr_text());
    assert_eq!(std::fs::read_to_string(test.path("kept.txt")).unwrap(), "kept\n");

    // Stop and start: both the workspace and the container's own filesystem survive.
    test.sandbox.stop().await.unwrap();
    assert_eq!(test.sandbox.state().await.unwrap(), ContainerState::Exited);
    let refused = test.sandbox.exec(bash("true")).await.unwrap_err();
    assert!(matches!(refused, Error::NotRunning(_)), "{refused}");
    test.sandbox.start().await.unwrap();
    assert_eq!(test.bash("cat /home/sandbox/layer.txt").await.stdout_text(), "layer\n");

    // Remove: the workspace stays on the host; a new container of the same
    // workspace sees it, and nothing written outside it.
    test.sandbox.remove().await.unwrap();
    assert_eq!(test.sandbox.state().await.unwrap(), ContainerState::Gone);
    assert_eq!(std::fs::read_to_string(test.path("kept.txt")).unwrap(), "kept\n");
    let (engine, image) = engine_and_image().await;
    let again = SandboxSpec::new(SandboxId::new().to_string(), image, &test.workspace).runtime(runtime);
    let second = ContainerSandbox::create_started(&engine, again).await.unwrap();
    let look = second.exec(bash("cat /workspace/kept.txt; test -e /home/sandbox/layer.txt && echo leaked")).await;
    second.remove().await.unwrap();
    assert_eq!(look.unwrap().stdout_text(), "kept\n");
}

pub async fn exec_streams_output_and_takes_env_cwd_and_stdin(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    std::fs::create_dir(test.path("sub")).unwrap();
    let (sender, chunks) = recorder();
    let request = bash("id -un; pwd; echo \"$GREETING\"; cat; echo oops >&2; exit 3")
        .env("GREETING", "hello from env")
        .cwd("/workspace/sub")
        .stdin(StdinSource::Bytes(b"from stdin\n".to_vec()))
        .output(sender);
    let outcome = test.sandbox.exec(request).await.unwrap();
    assert_eq!(outcome.termination, Termination::Exited { code: 3 });
    assert_eq!(outcome.stdout_text(), "sandbox\n/workspace/sub\nhello from env\nfrom stdin\n");
    assert_eq!(outcome.stderr_text(), "oops\n");
    assert_eq!(outcome.tier, TierKind::Container);
    let streamed: Vec<u8> = chunks
        .lock()
        .unwrap()
        .iter()
        .filter(|chunk| chunk.stream == OutputStream::Stdout)
        .flat_map(|chunk| chunk.bytes.clone())
        .collect();
    assert_eq!(streamed, outcome.stdout, "streamed output differs from captured");
    // The host process's environment is not inherited.
    let env = test.bash("env").await.stdout_text();
    assert!(!env.contains("CARGO"), "host environment leaked: {env}");
}

/// How many engine execs the container has had, from the engine's event log.
fn engine_execs(container_id: &str) -> usize {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let out = std::process::Command::new("docker")
        .args(["events", "--since", "0", "--until", &now.to_string(), "--format", "{{.Action}}"])
        .args(["--filter", &format!("container={container_id}")])
        .output()
        .expect("running docker events");
    assert!(out.status.success(), "docker events: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|action| action.starts_with("exec_start")).count()
}

pub async fn commands_go_through_the_agent_on_one_stream(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let id = test.sandbox.container_id().to_string();
    let before = engine_execs(&id);

    // Many commands at once on the one stream: each gets its own output and code.
    let runs = (0..12).map(|index| {
        let sandbox = test.sandbox.clone();
        tokio::spawn(async move {
            let script = format!("for i in 1 2 3; do echo run{index}-$i; echo err{index} >&2; done; exit {index}");
            sandbox.exec(bash(&script)).await.unwrap()
        })
    });
    for (index, run) in futures_util::future::join_all(runs).await.into_iter().enumerate() {
        let outcome = run.unwrap();
        assert_eq!(outcome.termination, Termination::Exited { code: index as i32 });
        assert_eq!(outcome.stdout_text(), format!("run{index}-1\nrun{index}-2\nrun{index}-3\n"));
        assert_eq!(outcome.stderr_text(), format!("err{index}\n").repeat(3));
    }
    // A megabyte of stdin, in many frames, arrives whole and in order.
    let input: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let digest = test
        .sandbox
        .exec(ExecRequest::new("sha256sum").stdin(StdinSource::Bytes(input.clone())))
        .await
        .unwrap()
        .stdout_text();
    let expected = test.sandbox.exec_as("root", ExecRequest::new("sha256sum").stdin(StdinSource::Bytes(input))).await;
    assert_eq!(digest, expected.unwrap().stdout_text(), "the sandbox user and root disagree");
    // A missing working directory is named.
    let nowhere = test.sandbox.exec(ExecRequest::new("true").cwd("/no/such/dir")).await.unwrap();
    assert!(!nowhere.success());
    assert!(nowhere.stderr_text().contains("/no/such/dir"), "{}", nowhere.stderr_text());

    // Background processes too: started, signalled and reaped through the agent.
    let sleeper = test.sandbox.start_process(ExecRequest::new("sleep").args(["300"])).await.unwrap();
    let mut follower = test.sandbox.follow_process(&sleeper).unwrap();
    test.sandbox.signal_process(&sleeper, Signal::Term).await.unwrap();
    assert_eq!(test.sandbox.wait_process(&sleeper).await.unwrap(), Some(128 + 15));
    assert_eq!(follower.next().await, Some(ProcessEvent::Exited(Some(143))));

    // None of that was an engine exec, not even the root command.
    let after = engine_execs(&id);
    assert_eq!(after, before, "commands went through engine execs");

    // Another handle on the same container (as after a restart) shares the link and works.
    let (engine, _) = engine_and_image().await;
    let adopted = ContainerSandbox::adopt(&engine, &id).await.unwrap();
    assert_eq!(adopted.exec(bash("echo adopted")).await.unwrap().stdout_text(), "adopted\n");
    assert_eq!(test.bash("echo original").await.stdout_text(), "original\n");

    // Paused: refused at once, not left to hang; unpaused: the same link answers.
    test.sandbox.pause().await.unwrap();
    let refused = test.sandbox.exec(bash("true")).await.unwrap_err();
    assert!(matches!(refused, Error::NotRunning(_)), "{refused}");
    test.sandbox.unpause().await.unwrap();
    assert!(test.bash("true").await.success());
    assert_eq!(engine_execs(&id), after, "no engine exec after all");
}

pub async fn the_deadline_kills_the_whole_process_tree(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let request = bash("sleep 300 & (sleep 301 &) ; setsid sleep 302 & echo started; wait").limits(deadline(2));
    let outcome = test.sandbox.exec(request).await.unwrap();
    assert_eq!(outcome.limit_exceeded().map(|hit| hit.limit), Some(Limit::Deadline), "{:?}", outcome.termination);
    assert_eq!(outcome.stdout_text(), "started\n");
    assert!(outcome.wall_time < Duration::from_secs(10), "took {:?}", outcome.wall_time);
    // Children, an orphan and a new session: all gone.
    let left = test.bash("ps -eo args | grep -c '^sleep 30[012]$'").await;
    assert_eq!(left.stdout_text().trim(), "0", "survivors: {}", test.bash("ps -ef").await.stdout_text());
}

pub async fn an_output_flood_is_cut_at_the_cap(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let limits = Limits { output_bytes: 64 * 1024, ..deadline(20) };
    let outcome = test.sandbox.exec(ExecRequest::new("yes").limits(limits)).await.unwrap();
    assert_eq!(outcome.limit_exceeded().map(|hit| hit.limit), Some(Limit::Output), "{:?}", outcome.termination);
    assert_eq!(outcome.stdout.len(), 64 * 1024);
    assert!(outcome.stdout_truncated);
    assert_eq!(test.bash("pgrep -c yes").await.stdout_text().trim(), "0");
}

pub async fn a_fork_bomb_is_contained_by_the_pids_limit(runtime: ContainerRuntime) {
    let resources = ContainerResources { pids: 64, ..ContainerResources::default() };
    let test = TestSandbox::with_resources(runtime, resources).await;
    let outcome = test.sandbox.exec(bash("bomb() { bomb | bomb; }; bomb").limits(deadline(4))).await.unwrap();
    match runtime {
        ContainerRuntime::Runc => {
            // Stopped at the deadline, or at the output cap by bash's "fork: retry" complaints.
            assert!(outcome.limit_exceeded().is_some(), "{:?}", outcome.termination);
            assert!(outcome.stderr_text().contains("Resource temporarily unavailable"), "the pids limit never bit");
        }
        ContainerRuntime::Runsc => {
            // The limit binds gVisor's own host threads too: the sandbox goes down
            // whole, the host does not notice, and a start brings it back.
            assert!(!outcome.success(), "{:?}", outcome.termination);
            // It may still be going down: restart it until a command runs again.
            let mut recovered = false;
            for _ in 0..5 {
                if test.sandbox.state().await.unwrap() == ContainerState::Running
                    && test.sandbox.exec(bash("true")).await.is_ok_and(|outcome| outcome.success())
                {
                    recovered = true;
                    break;
                }
                test.sandbox.stop().await.unwrap();
                test.sandbox.start().await.unwrap();
            }
            assert!(recovered, "the sandbox did not come back after the bomb");
        }
    }
    // The sandbox is still usable, and the bomb is gone.
    let after = test.bash("echo alive; ps -e --no-headers | wc -l").await;
    assert!(after.success(), "{:?} {}", after.termination, after.stderr_text());
    let lines: Vec<String> = after.stdout_text().lines().map(String::from).collect();
    assert_eq!(lines[0], "alive");
    let processes: u32 = lines[1].trim().parse().unwrap();
    assert!(processes < 10, "{processes} processes left after the bomb");
}

pub async fn a_memory_bomb_is_reported_as_out_of_memory(runtime: ContainerRuntime) {
    let resources = ContainerResources { memory_bytes: 128 << 20, ..ContainerResources::default() };
    let test = TestSandbox::with_resources(runtime, resources).await;
    let bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n";
    let outcome = test.sandbox.exec(ExecRequest::new("python3").args(["-c", bomb]).limits(deadline(60))).await.unwrap();
    let hit = outcome.limit_exceeded();
    assert_eq!(hit.map(|hit| hit.limit), Some(Limit::Memory), "{:?} {}", outcome.termination, outcome.stderr_text());
    assert_eq!(hit.map(|hit| hit.value), Some(128 << 20));
}

pub async fn privileged_operations_are_denied(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    // As the sandbox user and as root inside the sandbox.
    for (who, outcome) in [
        ("user", test.bash("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m").await),
        ("root", test.bash_as_root("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m").await),
    ] {
        assert!(!outcome.success(), "{who} could mount: {}", outcome.stdout_text());
    }
    let raw_socket = "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n    print('opened')\nexcept PermissionError:\n    print('denied')\n";
    assert_eq!(test.sandbox.exec_as("root", python(raw_socket)).await.unwrap().stdout_text(), "denied\n");
    assert_eq!(test.sandbox.exec(python(raw_socket)).await.unwrap().stdout_text(), "denied\n");

    // ptrace of another user's process: root cannot trace the sandbox user's, nor the reverse.
    let target = test.sandbox.start_process(ExecRequest::new("sleep").args(["300"])).await.unwrap();
    // The background exec may still be starting when start_process returns.
    let find = "for _ in $(seq 400); do p=$(pgrep -u sandbox -x sleep | head -1); [ -n \"$p\" ] && { echo $p; exit; }; sleep 0.05; done";
    let pid = test.bash(find).await.stdout_text().trim().to_string();
    assert!(!pid.is_empty(), "no target process");
    let attach = format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.ptrace(16, {pid}, 0, 0)\nprint('attached' if r == 0 else os.strerror(ctypes.get_errno()))\n"
    );
    let traced = test.sandbox.exec_as("root", python(&attach)).await.unwrap();
    assert_eq!(traced.stdout_text(), "Operation not permitted\n", "{}", traced.stderr_text());
    test.sandbox.signal_process(&target, Signal::Kill).await.unwrap();

    // Loading a kernel module (finit_module, syscall 313 on x86-64).
    let module = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = os.open('/bin/true', os.O_RDONLY)\nr = libc.syscall(313, fd, b'', 0)\nprint('loaded' if r == 0 else 'denied')\n";
    assert_eq!(test.sandbox.exec_as("root", python(module)).await.unwrap().stdout_text(), "denied\n");

    // No Docker socket, no privilege gain, no network but loopback.
    let socket = test
        // /usr is pruned from the walk: the image's data stack makes it outlast
        // the deadline under gVisor. A socket mounted in (anywhere, by any
        // name) is a mount point, and every mount point is checked.
        .bash(
            "for p in /var/run/docker.sock /run/docker.sock; do [ -e $p ] && echo $p; done; \
             for m in $(awk '{print $5}' /proc/self/mountinfo); do [ -S \"$m\" ] && echo \"mounted socket $m\"; done; \
             find / -xdev -path /usr -prune -o -type s -name '*docker*' -print 2>/dev/null",
        )
        .await;
    assert!(socket.success() || socket.exit_code() == Some(1), "{:?}", socket.termination);
    assert_eq!(socket.stdout_text(), "", "a docker socket inside");
    let no_new_privileges = python("import ctypes\nprint(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))\n");
    assert_eq!(test.sandbox.exec(no_new_privileges).await.unwrap().stdout_text(), "1\n", "PR_GET_NO_NEW_PRIVS");
    let interfaces = test.bash("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").await.stdout_text();
    assert!(interfaces.lines().all(|name| name == "lo"), "interfaces: {interfaces:?}");
    let reach = python(
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n    print('reached')\nexcept OSError:\n    print('unreachable')\n",
    );
    assert_eq!(test.sandbox.exec(reach).await.unwrap().stdout_text(), "unreachable\n");
}

fn python(code: &str) -> ExecRequest {
    ExecRequest::new("python3").args(["-c", code])
}

pub async fn background_processes_are_listed_followed_signalled_and_awaited(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let counter = test
        .sandbox
        .start_process(bash("for i in 1 2 3; do echo line$i; sleep 0.2; done; echo done >&2; exit 7"))
        .await
        .unwrap();
    let server = test.sandbox.start_process(ExecRequest::new("sleep").args(["300"])).await.unwrap();

    let mut follower = test.sandbox.follow_process(&counter).unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(30), follower.next()).await.unwrap() {
            Some(ProcessEvent::Output(chunk)) if chunk.stream == OutputStream::Stdout => {
                stdout.push_str(&String::from_utf8_lossy(&chunk.bytes))
            }
            Some(ProcessEvent::Output(chunk)) => stderr.push_str(&String::from_utf8_lossy(&chunk.bytes)),
            Some(ProcessEvent::Exited(code)) => break code,
            None => panic!("the follower ended without an exit"),
        }
    };
    assert_eq!((stdout.as_str(), stderr.as_str(), exit), ("line1\nline2\nline3\n", "done\n", Some(7)));
    // A late follower replays the log.
    let mut late = test.sandbox.follow_process(&counter).unwrap();
    assert!(matches!(late.next().await, Some(ProcessEvent::Output(chunk)) if chunk.bytes == b"line1\n"));

    let listed = test.sandbox.list_processes();
    assert_eq!(listed.len(), 2);
    let status = |id: &str| test.sandbox.list_processes().into_iter().find(|p| p.id == id).unwrap().status;
    assert_eq!(status(&counter), ProcessStatus::Exited { code: Some(7) });
    assert_eq!(status(&server), ProcessStatus::Running);

    test.sandbox.signal_process(&server, Signal::Term).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), test.sandbox.wait_process(&server)).await.unwrap();
    assert_eq!(code.unwrap(), Some(143), "128 + SIGTERM");
    assert!(matches!(test.sandbox.follow_process("nope"), Err(Error::NoSuchProcess(_))));
}

pub async fn a_pty_session_takes_input_and_resizes(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let mut pty = test
        .sandbox
        .open_pty(ExecRequest::new("bash").args(["--norc", "-i"]), PtySize { cols: 80, rows: 24 })
        .await
        .unwrap();
    pty.write(b"stty size; [ -t 0 ] && echo on-a-terminal\n").await.unwrap();
    let seen = read_until(&mut pty, "\non-a-terminal").await;
    assert!(seen.contains("24 80"), "{seen}");
    pty.resize(PtySize { cols: 132, rows: 40 }).await.unwrap();
    pty.write(b"stty size\n").await.unwrap();
    read_until(&mut pty, "40 132").await;
    pty.write(b"exit 5\n").await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), pty.wait()).await.unwrap().unwrap();
    assert_eq!(code, Some(5));

    // The session owns its command: dropping it ends the whole tree.
    let mut pty =
        test.sandbox.open_pty(ExecRequest::new("bash").args(["--norc", "-i"]), PtySize::default()).await.unwrap();
    pty.write(b"sleep 315 & setsid sleep 316 & echo went-background\n").await.unwrap();
    read_until(&mut pty, "\nwent-background").await;
    until_count(&test, "sleep 31[56]", 2, Duration::from_secs(10)).await;
    drop(pty);
    until_none(&test, "sleep 31[56]", Duration::from_secs(5)).await;
}

async fn read_until(pty: &mut airlock::container::PtySession, wanted: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(wanted) {
        let chunk = tokio::time::timeout(Duration::from_secs(30), pty.read())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} in {seen:?}"))
            .unwrap_or_else(|| panic!("the terminal closed before {wanted:?}: {seen:?}"))
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

pub async fn a_port_inside_is_reachable_without_a_network(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    std::fs::write(test.path("index.html"), "hello from the sandbox\n").unwrap();
    let server = ExecRequest::new("python3").args(["-m", "http.server", "8000", "--bind", "127.0.0.1"]);
    let server = test.sandbox.start_process(server).await.unwrap();
    let mut stream = None;
    for _ in 0..100 {
        match test.sandbox.connect_port(8000).await {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(Error::Port { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("{other}"),
        }
    }
    let mut stream = stream.expect("the server never listened");
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: sandbox\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut response)).await.unwrap().unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("hello from the sandbox\n"), "{response}");
    test.sandbox.signal_process(&server, Signal::Kill).await.unwrap();
    // Nothing listening: a clear error naming the port.
    let refused = test.sandbox.connect_port(8001).await.unwrap_err();
    assert!(matches!(refused, Error::Port { port: 8001, .. }), "{refused}");
}

pub async fn labelled_containers_are_listed_and_adopted(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let (engine, _) = engine_and_image().await;
    let listed = list_labelled(&engine).await.unwrap();
    let mine = listed.iter().find(|c| c.container_id == test.sandbox.container_id()).expect("not listed");
    assert_eq!(mine.sandbox_id, test.sandbox.sandbox_id());
    assert_eq!(mine.state, ContainerState::Running);

    let adopted = ContainerSandbox::adopt(&engine, test.sandbox.container_id()).await.unwrap();
    assert_eq!(adopted.spec(), test.sandbox.spec());
    let outcome = adopted.exec(bash("echo adopted > /workspace/a.txt")).await.unwrap();
    assert!(outcome.success());
    assert_eq!(std::fs::read_to_string(test.path("a.txt")).unwrap(), "adopted\n");
}

pub async fn the_tier_seam_runs_in_the_workspace(runtime: ContainerRuntime) {
    let (engine, image) = engine_and_image().await;
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::create(dir.path().join("workspace")).unwrap();
    std::fs::write(workspace.host_path().join("from-host.txt"), "host\n").unwrap();
    let tier =
        ContainerTier::new(engine, ContainerTemplate { image, runtime, resources: ContainerResources::default() });
    let tier_object: &dyn Tier = &tier;
    assert_eq!(tier_object.kind(), TierKind::Container);
    let outcome = tier_object
        .exec(&workspace, bash("cat from-host.txt && git init -q . && git status --short | wc -l"))
        .await
        .unwrap();
    assert!(outcome.success(), "{}", outcome.stderr_text());
    assert_eq!(outcome.stdout_text(), "host\n1\n");
    assert!(workspace.host_path().join(".git").is_dir());
    // The same workspace reuses its container.
    let first = tier.sandbox_for(&workspace).await.unwrap();
    let second = tier.sandbox_for(&workspace).await.unwrap();
    assert_eq!(first.container_id(), second.container_id());
    tier.shutdown().await.unwrap();
    assert!(exists(&workspace.host_path().join("from-host.txt")));
}

pub async fn bad_requests_get_clear_errors(runtime: ContainerRuntime) {
    let (engine, _) = engine_and_image().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = SandboxSpec::new(SandboxId::new().to_string(), "airlock/no-such-image:1", dir.path()).runtime(runtime);
    let missing = ContainerSandbox::create(&engine, spec).await.unwrap_err();
    assert!(missing.to_string().contains("airlock/no-such-image:1 is not in the local docker engine"), "{missing}");

    let test = TestSandbox::new(runtime).await;
    let empty = test.sandbox.exec(ExecRequest::new("")).await.unwrap_err();
    assert!(empty.to_string().contains("the program is empty"), "{empty}");
    let not_found = test.sandbox.exec(ExecRequest::new("no-such-command")).await.unwrap();
    // 126 from the engine (runc cannot exec it) or 127 from a shell, as a shell would say.
    assert!(matches!(not_found.exit_code(), Some(126 | 127)), "{:?}", not_found.termination);
    let said = format!("{}{}", not_found.stdout_text(), not_found.stderr_text());
    assert!(said.contains("no-such-command"), "{said}");
    let bad_limits = Limits { deadline: Duration::ZERO, ..Limits::default() };
    assert!(test.sandbox.exec(bash("true").limits(bad_limits)).await.is_err());

    // A second container for the same sandbox is refused by name.
    let (_, image) = engine_and_image().await;
    let twin = SandboxSpec::new(test.sandbox.sandbox_id(), image, &test.workspace).runtime(runtime);
    let refused = ContainerSandbox::create(&engine, twin).await.unwrap_err();
    assert!(refused.to_string().contains("409") || refused.to_string().contains("Conflict"), "{refused}");
}

pub async fn cpu_time_comes_from_the_cgroup(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let spin = "import time\nend = time.time() + 1\nwhile time.time() < end:\n    pass\n";
    let busy = test.sandbox.exec(python(spin)).await.unwrap();
    let idle = test.sandbox.exec(bash("sleep 1")).await.unwrap();
    assert!(busy.cpu_time > Duration::from_millis(300), "busy loop billed {:?}", busy.cpu_time);
    assert!(idle.cpu_time < Duration::from_millis(300), "sleep billed {:?}", idle.cpu_time);
    assert!(test.sandbox.cpu_usage().unwrap() >= busy.cpu_time);
}

/// How many processes whose command line is exactly one of `wanted`, seen as
/// root inside the container (`ps` reads every process's `/proc`).
async fn count_processes(test: &TestSandbox, pattern: &str) -> usize {
    let script = format!("ps -eo args= | grep -cE '^({pattern})$' || true");
    let seen = test.bash_as_root(&script).await;
    seen.stdout_text()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("ps said {:?} {:?}", seen.stdout_text(), seen.stderr_text()))
}

/// Waits (up to `within`) until no process matches `pattern`; how long it took.
async fn until_none(test: &TestSandbox, pattern: &str, within: Duration) -> Duration {
    until_count(test, pattern, 0, within).await
}

/// Waits (up to `within`) until exactly `wanted` processes match `pattern`:
/// a shell reports a job started before its fork has exec'd the command.
async fn until_count(test: &TestSandbox, pattern: &str, wanted: usize, within: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if count_processes(test, pattern).await == wanted {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not {wanted} of {pattern:?} after {within:?}: {}",
            test.bash_as_root("ps -eo pid,ppid,pgid,sid,user,args").await.stdout_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tree with a child, an orphan, a new session, a double fork out of a new
/// session and a process that wiped its environment: sleeps 310 to 314.
const ESCAPING_TREE: &str = "sleep 310 & (sleep 311 &); setsid sleep 312 & \
    setsid bash -c 'bash -c \"sleep 313 &\" &' ; env -i setsid sleep 314 & \
    sleep 0.5; echo started; wait";
const ESCAPING_SLEEPS: &str = "sleep 31[0-4]";

pub async fn a_dropped_exec_kills_its_whole_tree(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let (sender, chunks) = recorder();
    let sandbox = test.sandbox.clone();
    let exec =
        tokio::spawn(async move { sandbox.exec(bash(ESCAPING_TREE).limits(deadline(600)).output(sender)).await });
    let started = std::time::Instant::now();
    while !chunks.lock().unwrap().iter().any(|chunk| chunk.bytes.ends_with(b"started\n")) {
        assert!(started.elapsed() < Duration::from_secs(30), "the tree never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_count(&test, ESCAPING_SLEEPS, 5, Duration::from_secs(10)).await;
    // Some left their session and process group; one is parented by no one of theirs.
    let sessions =
        test.bash_as_root("ps -eo sid=,args= | grep -E 'sleep 31[0-4]$' | awk '{print $1}' | sort -u | wc -l").await;
    assert!(sessions.stdout_text().trim().parse::<u32>().unwrap() >= 3, "{}", sessions.stdout_text());

    // The caller goes away (a disconnect): its future is dropped.
    exec.abort();
    assert!(exec.await.unwrap_err().is_cancelled());
    let took = until_none(&test, ESCAPING_SLEEPS, Duration::from_secs(5)).await;
    eprintln!("the dropped exec's tree was gone {took:?} after the drop");
    // The shepherd went with it, and the sandbox works on.
    until_none(&test, "airlock-shepherd .*s[l]eep 31.*", Duration::from_secs(5)).await;
    assert_eq!(test.bash("echo alive").await.stdout_text(), "alive\n");
}

pub async fn a_command_leaves_nothing_running_when_it_ends(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let outcome = test.bash(&ESCAPING_TREE.replace("; wait", "")).await;
    assert!(outcome.success(), "{:?} {}", outcome.termination, outcome.stderr_text());
    until_none(&test, ESCAPING_SLEEPS, Duration::from_secs(5)).await;
    // Even when the shepherd itself is gone (root may kill it: same uid), the
    // run's marker group still finds what is left.
    let orphaned = test.bash_as_root("setsid sleep 318 & sleep 0.3; kill -9 $PPID; sleep 30").await;
    assert_eq!(orphaned.exit_code(), Some(137), "{:?}", orphaned.termination);
    until_none(&test, "sleep 318|sleep 30", Duration::from_secs(5)).await;
}

pub async fn the_agent_cannot_be_signalled_traced_or_read(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let find = "ps -eo pid=,args= | awk '$2 == \"/.airlock/agent\" { print $1 }'";
    let agent = test.bash(find).await.stdout_text().trim().to_string();
    assert!(!agent.is_empty() && agent != "1", "agent pid {agent:?}");
    let owner = test.bash(&format!("ps -o user= -p {agent}; id -un")).await.stdout_text();
    assert_eq!(owner, "root\nsandbox\n", "the agent runs apart from the sandbox user");

    // As the sandbox's user: every way at the agent, at init and at this
    // command's own shepherd ($PPID) fails.
    let ptrace = |pid: &str| {
        format!(
            "python3 -c \"import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
             print('attached' if libc.ptrace(16, {pid}, 0, 0) == 0 else 'ptrace: ' + os.strerror(ctypes.get_errno()))\""
        )
    };
    let attack = format!(
        "a={agent}; s=$PPID; \
         ps -o args= -p $s | grep -q '^airlock-shepherd' || echo not-a-shepherd; \
         for p in $a 1 $s; do kill -9 $p 2>/dev/null && echo killed-$p; kill -STOP $p 2>/dev/null && echo stopped-$p; done; \
         python3 -c \"open('/proc/$a/mem', 'rb')\" 2>/dev/null && echo opened-mem; \
         ls /proc/$a/fd >/dev/null 2>&1 && echo listed-fds; \
         (echo x > /proc/$a/fd/0) 2>/dev/null && echo wrote-its-stdin; \
         {}; echo done",
        ptrace("$a")
    );
    let user = test.bash(&attack).await;
    assert_eq!(user.stdout_text(), "ptrace: Operation not permitted\ndone\n", "{}", user.stderr_text());
    // Its environment: closed under runc. gVisor (this release) lets anyone
    // read a process's environ; the agent's holds only the container's own
    // variables, which every command already has (see SECURITY.md).
    let environ = test
        .bash(&format!("set -o pipefail; tr '\\0' '\\n' < /proc/{agent}/environ | cut -d= -f1 | sort | tr '\\n' ' '"))
        .await;
    match runtime {
        ContainerRuntime::Runc => {
            assert!(!environ.success(), "read the agent's environment: {}", environ.stdout_text())
        }
        ContainerRuntime::Runsc => {
            let names = environ.stdout_text();
            assert!(
                names.split_whitespace().all(|name| ["HOME", "HOSTNAME", "LANG", "PATH"].contains(&name)),
                "the agent's environment holds more than the container's: {names}"
            );
        }
    }
    // Everything the user may signal at once: only its own processes go.
    let everything = test.bash("sleep 317 & sleep 0.2; kill -9 -1; wait; echo signalled-all").await;
    assert_eq!(everything.stdout_text(), "signalled-all\n", "{:?}", everything.termination);

    // Even root in the sandbox (no CAP_SYS_PTRACE) cannot trace the agent,
    // read it or open its descriptors: it is not dumpable. (Root may list the
    // descriptors' numbers, and may signal it: see SECURITY.md.)
    let as_root = format!(
        "a={agent}; python3 -c \"open('/proc/$a/mem', 'rb')\" 2>/dev/null && echo opened-mem; \
         (echo x > /proc/$a/fd/0) 2>/dev/null && echo wrote-its-stdin; \
         (cat < /proc/$a/fd/1) 2>/dev/null && echo read-its-stdout; {}; echo done",
        ptrace("$a")
    );
    let root = test.bash_as_root(&as_root).await;
    assert_eq!(root.stdout_text(), "ptrace: Operation not permitted\ndone\n", "{}", root.stderr_text());

    // The same agent still answers.
    assert_eq!(test.bash(find).await.stdout_text().trim(), agent);
    assert_eq!(test.bash("echo alive").await.stdout_text(), "alive\n");
}

pub async fn a_deadline_holds_under_an_output_flood(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    // Small writes from two processes as fast as they go, with room under the
    // output cap, read by a slow consumer (5 ms a chunk, say a slow socket):
    // replies are ready every time the exec loop looks, so a loop that took
    // them before its timer would never see the deadline.
    let flood = "import os\nos.fork()\nwhile True:\n    os.write(1, b'x' * 64)\n    os.write(2, b'y' * 64)\n";
    let limits = Limits { output_bytes: 256 << 20, ..deadline(2) };
    let chunks = Arc::new(AtomicUsize::new(0));
    let counted = chunks.clone();
    let slow: OutputSender = Arc::new(move |_chunk: OutputChunk| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
    });
    let run = test.sandbox.exec(python(flood).limits(limits).output(slow));
    let outcome = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the deadline never hit").unwrap();
    assert_eq!(outcome.limit_exceeded().map(|hit| hit.limit), Some(Limit::Deadline), "{:?}", outcome.termination);
    assert!(outcome.wall_time < Duration::from_secs(10), "the run ended {:?} after the start", outcome.wall_time);
    assert!(chunks.load(Ordering::SeqCst) > 100, "there was no flood");
    until_none(&test, "python3 -c .*", Duration::from_secs(5)).await;
}

pub async fn the_process_log_keeps_the_newest_output_within_its_bound(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    let total = 3 * airlock::container::PROCESS_LOG_BYTES;
    let script = format!("head -c {} /dev/zero | tr '\\0' x; echo; echo the-end", total - 1);
    let id = test.sandbox.start_process(bash(&script)).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(60), test.sandbox.wait_process(&id)).await.unwrap();
    assert_eq!(code.unwrap(), Some(0));
    let mut follower = test.sandbox.follow_process(&id).unwrap();
    let mut kept = Vec::new();
    while let Some(event) = follower.next().await {
        if let ProcessEvent::Output(chunk) = event {
            kept.extend_from_slice(&chunk.bytes);
        }
    }
    assert!(kept.len() <= airlock::container::PROCESS_LOG_BYTES, "kept {} bytes", kept.len());
    assert!(kept.ends_with(b"x\nthe-end\n"), "the newest output is kept");
    assert_eq!(
        kept.len() as u64 + follower.dropped_bytes,
        total as u64 + "the-end\n".len() as u64,
        "dropped bytes are counted"
    );
}

/// Everything a follower gives until the exit: the output bytes, and the exit code.
async fn follow_to_exit(follower: &mut airlock::container::ProcessFollower) -> (Vec<u8>, Option<i32>) {
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), follower.next()).await.expect("no exit within 30 s") {
            Some(ProcessEvent::Output(chunk)) => bytes.extend(chunk.bytes),
            Some(ProcessEvent::Exited(code)) => return (bytes, code),
            None => panic!("the follower ended without an exit"),
        }
    }
}

pub async fn background_stdin_is_written_and_closed_and_logs_resume_at_an_offset(runtime: ContainerRuntime) {
    let test = TestSandbox::new(runtime).await;
    // Stdin left open: what is written arrives, and closing it ends `cat`.
    let cat = test
        .sandbox
        .start_process_with_stdin(ExecRequest::new("cat").stdin(StdinSource::Bytes(b"first\n".to_vec())))
        .await
        .unwrap();
    test.sandbox.write_process_stdin(&cat, b"second\n").await.unwrap();
    test.sandbox.close_process_stdin(&cat).await.unwrap();
    let (bytes, code) = follow_to_exit(&mut test.sandbox.follow_process(&cat).unwrap()).await;
    assert_eq!((bytes.as_slice(), code), (b"first\nsecond\n".as_slice(), Some(0)));
    assert!(matches!(test.sandbox.write_process_stdin(&cat, b"late").await, Err(Error::StdinClosed(_))));
    assert!(matches!(test.sandbox.close_process_stdin(&cat).await, Err(Error::StdinClosed(_))));

    // Without an open stdin: bytes then end of file, and writes refused.
    let once = test
        .sandbox
        .start_process(ExecRequest::new("cat").stdin(StdinSource::Bytes(b"only\n".to_vec())))
        .await
        .unwrap();
    assert!(matches!(test.sandbox.write_process_stdin(&once, b"x").await, Err(Error::StdinClosed(_))));
    let (bytes, code) = follow_to_exit(&mut test.sandbox.follow_process(&once).unwrap()).await;
    assert_eq!((bytes.as_slice(), code), (b"only\n".as_slice(), Some(0)));

    // Resuming at an offset gives the rest of the output, across both streams.
    let writer = test.sandbox.start_process(bash("echo 0123456789; echo abc >&2; echo tail")).await.unwrap();
    let (all, _) = follow_to_exit(&mut test.sandbox.follow_process(&writer).unwrap()).await;
    assert_eq!(all.len(), 20, "{:?}", String::from_utf8_lossy(&all));
    let mut resumed = test.sandbox.follow_process_from(&writer, 7).unwrap();
    let (rest, code) = follow_to_exit(&mut resumed).await;
    assert_eq!((rest.as_slice(), code), (&all[7..], Some(0)));
    assert_eq!((resumed.position(), resumed.missed_bytes()), (20, 0));

    // A signal without a variant of its own, by number: the trap sees it.
    let trapper = test
        .sandbox
        .start_process(bash("trap 'echo got-winch; exit 4' WINCH; echo ready; while :; do sleep 0.1; done"))
        .await
        .unwrap();
    let mut follower = test.sandbox.follow_process(&trapper).unwrap();
    assert!(matches!(follower.next().await, Some(ProcessEvent::Output(chunk)) if chunk.bytes == b"ready\n"));
    test.sandbox.signal_process(&trapper, Signal::from_name("SIGWINCH").unwrap()).await.unwrap();
    let (bytes, code) = follow_to_exit(&mut follower).await;
    assert_eq!((bytes.as_slice(), code), (b"got-winch\n".as_slice(), Some(4)));
}
