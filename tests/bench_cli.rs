//! `airlock bench` end to end: the real binary runs a small quick subset in a
//! temporary home (an isolate cold start, an evaluation in a context, the
//! paired HTTP case, a warm container command, the staggered TTI mode and the
//! docker exec peer; then the egress, pip install and density cases),
//! and the JSON, Markdown and SVG it writes are checked for shape and
//! consistency — never for a number. Needs Docker (`airlock setup`): without
//! it the container cases fail, and so does this test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test may

use std::process::Command;

use serde_json::Value;

const REPETITIONS: u64 = 3;
const WARMUP: u64 = 1;

fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

#[test]
fn quick_subset_writes_consistent_json_markdown_and_svg() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("bench.json");
    let markdown = out.path().join("report");
    let started = std::time::Instant::now();
    let output = airlock()
        .args([
            "bench",
            "--quick",
            "--only",
            "python-cold,js-eval,http-eval,runc-bash-warm,tti-staggered,peer-docker-exec",
        ])
        .args(["--repetitions", &REPETITIONS.to_string(), "--warmup", &WARMUP.to_string()])
        .arg("--json")
        .arg(&json_path)
        .arg("--markdown")
        .arg(&markdown)
        .arg("--home")
        .arg(home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "airlock bench failed (Docker running? `airlock setup`)\n{stdout}\n{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(300), "took {:?}", started.elapsed());
    // Progress on stderr, the table on stdout.
    assert!(stderr.contains("[1/6] python-cold"), "{stderr}");
    assert!(stdout.contains("median") && stdout.contains("machine:"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["quick"], true);
    assert!(report["duration_s"].as_f64().unwrap() > 0.0);
    let machine = &report["machine"];
    for field in ["kernel", "cpu_model", "docker_version", "load_average_start", "load_average_end"] {
        assert!(!machine[field].as_str().unwrap().is_empty(), "machine.{field}: {machine}");
    }
    assert!(machine["cores"].as_u64().unwrap() >= 1);
    assert!(machine["memory_mib"].as_u64().unwrap() > 0);
    assert!(machine["runsc_registered"].is_boolean());

    let results = report["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "python-cold",
            "js-eval",
            "runc-bash-warm",
            "tti-staggered",
            "http-eval-library",
            "http-eval-http",
            "peer-docker-exec"
        ]
    );
    for result in results {
        let name = result["name"].as_str().unwrap();
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["repetitions"], REPETITIONS, "{name}");
        let stats = &result["stats"];
        let get = |field: &str| stats[field].as_f64().unwrap_or_else(|| panic!("{name}: no {field} in {stats}"));
        assert_eq!(stats["samples"], REPETITIONS, "{name}");
        assert!(get("min_ms") > 0.0, "{name}: {stats}");
        assert!(get("min_ms") <= get("median_ms"), "{name}: {stats}");
        assert!(get("median_ms") <= get("p90_ms"), "{name}: {stats}");
        assert!(get("p90_ms") <= get("p99_ms"), "{name}: {stats}");
        assert!(get("p99_ms") <= get("max_ms"), "{name}: {stats}");
        assert!(get("iqr_ms") >= 0.0 && get("mad_ms") >= 0.0, "{name}: {stats}");
        if name != "tti-staggered" {
            assert_eq!(result["warmup"], WARMUP, "{name}");
        }
    }
    let by_name = |name: &str| results.iter().find(|r| r["name"] == name).unwrap();
    assert_eq!(by_name("runc-bash-warm")["tier"], "container/runc");
    assert_eq!(by_name("http-eval-http")["path"], "http");
    // The TTI method: no warm-up, every sandbox launched 200 ms after the one
    // before (so the last starts 400 ms in), ComputeSDK's trim, and their
    // published medians beside ours.
    let tti = by_name("tti-staggered");
    assert_eq!(tti["warmup"], 0);
    assert_eq!(tti["extra"]["mode"], "staggered");
    assert_eq!(tti["extra"]["stagger_delay_ms"], 200.0);
    assert_eq!(tti["extra"]["success_rate"], 1.0);
    assert_eq!(tti["extra"]["trim_fraction_each_end"], 0.05);
    let wall = tti["extra"]["wall_clock_ms"].as_f64().unwrap();
    let fastest = tti["stats"]["min_ms"].as_f64().unwrap();
    assert!(wall >= 400.0 + fastest, "wall clock {wall} ms: launches were not staggered");
    assert_eq!(tti["extra"]["published_medians_s"]["E2B"], 0.49);
    // Pairs: HTTP against the library, docker exec against Airlock's exec.
    let comparisons = report["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 2, "{comparisons:?}");
    assert_eq!((&comparisons[0]["a"], &comparisons[0]["b"]), (&"http-eval-library".into(), &"http-eval-http".into()));
    assert_eq!((&comparisons[1]["a"], &comparisons[1]["b"]), (&"runc-bash-warm".into(), &"peer-docker-exec".into()));
    assert!(comparisons.iter().all(|c| c["ratio_median"].as_f64().unwrap() > 0.0));
    // The docker exec peer's own container is gone.
    let left = Command::new("docker")
        .args(["ps", "-a", "--filter", "name=airlock-bench-peer-", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty(), "left behind: {:?}", left);

    let md = std::fs::read_to_string(markdown.join("report.md")).unwrap();
    assert!(md.starts_with("# airlock bench report"), "{md}");
    for group in ["cold-start", "warm", "tti", "http-overhead", "peer"] {
        assert!(md.contains(&format!("## {group}")), "{group} missing: {md}");
        assert!(md.contains(&format!("({group}.svg)")), "{group}.svg not linked: {md}");
        let svg = std::fs::read_to_string(markdown.join(format!("{group}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{group}.svg: {svg}");
        let bars = results.iter().filter(|r| r["group"] == group).count();
        assert_eq!(svg.matches("<rect").count(), bars, "{group}.svg: a rect per bar: {svg}");
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count(), "{svg}");
        assert_eq!(svg.matches("<rect").count(), svg.matches("</rect>").count(), "{svg}");
    }
}

#[test]
fn unknown_case_is_a_clear_error() {
    let output = airlock().args(["bench", "--only", "js-eval,no-such-case"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("\"no-such-case\""), "{stderr}");
    assert!(stderr.contains("valid cases") && stderr.contains("js-eval") && stderr.contains("tti-burst"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing ran");
}

/// The egress, pip and density cases: each pair measured in the same run and
/// compared, the proxy's side run in a container, the download's size and
/// rate recorded, the density cases stopped by their cap (set by
/// --repetitions) with the memory each sandbox costs, and nothing left running.
#[test]
fn egress_pip_and_density_cases_pair_measure_and_clean_up() {
    use sha2::Digest as _;
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("bench.json");
    let markdown = out.path().join("report");
    let output = airlock()
        .args([
            "bench",
            "--quick",
            "--only",
            "egress-latency,egress-download,pip-install,density-js,density-python,density-containers",
        ])
        .args(["--repetitions", &REPETITIONS.to_string(), "--warmup", &WARMUP.to_string()])
        .arg("--json")
        .arg(&json_path)
        .arg("--markdown")
        .arg(&markdown)
        .arg("--home")
        .arg(home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "airlock bench failed (Docker running? `airlock setup`)\n{stdout}\n{stderr}");
    assert!(stdout.contains("MiB/s") && stdout.contains("through the proxy"), "{stdout}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "egress-latency-direct",
            "egress-latency-proxy",
            "egress-download-direct",
            "egress-download-proxy",
            "pip-install",
            "density-js",
            "density-python",
            "density-containers"
        ]
    );
    for result in results {
        let name = result["name"].as_str().unwrap();
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["repetitions"], REPETITIONS, "{name}");
        assert_eq!(result["stats"]["samples"], REPETITIONS, "{name}");
        let (min, median, max) = (
            result["stats"]["min_ms"].as_f64().unwrap(),
            result["stats"]["median_ms"].as_f64().unwrap(),
            result["stats"]["max_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= median && median <= max, "{name}: {result}");
    }
    let by_name = |name: &str| results.iter().find(|r| r["name"] == name).unwrap();
    // The proxied side ran in a container, through the proxy; the direct side on the host.
    for name in ["egress-latency-proxy", "egress-download-proxy", "pip-install"] {
        assert_eq!(by_name(name)["tier"], "container/runc", "{name}");
        assert_eq!(by_name(name)["path"], "egress-proxy", "{name}");
    }
    for name in ["egress-latency-direct", "egress-download-direct"] {
        assert_eq!((&by_name(name)["tier"], &by_name(name)["path"]), (&"host".into(), &"direct".into()), "{name}");
    }
    for name in ["egress-download-direct", "egress-download-proxy"] {
        let extra = &by_name(name)["extra"];
        assert_eq!(extra["bytes"], 100 * 1024 * 1024, "{name}");
        assert!(extra["mib_per_second_at_median"].as_f64().unwrap() > 0.0, "{name}");
    }
    let comparisons = report["comparisons"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> =
        comparisons.iter().map(|c| (c["a"].as_str().unwrap(), c["b"].as_str().unwrap())).collect();
    assert_eq!(
        pairs,
        [("egress-latency-direct", "egress-latency-proxy"), ("egress-download-direct", "egress-download-proxy")]
    );
    // Density: stopped by the cap (3 here), with a memory figure per sandbox.
    for name in ["density-js", "density-python"] {
        let extra = &by_name(name)["extra"];
        assert_eq!(extra["contexts"], REPETITIONS, "{name}");
        assert_eq!(extra["stopped_by"], "cap of 3 reached", "{name}");
        assert!(extra["rss_per_context_mib"].is_number() && extra["rss_after_mib"].as_f64().unwrap() > 0.0, "{extra}");
    }
    let containers = &by_name("density-containers")["extra"];
    assert_eq!(containers["containers"], REPETITIONS);
    assert_eq!(containers["stopped_by"], "cap of 3 reached");
    let memory = containers["container_memory_mib"].as_array().unwrap();
    assert_eq!(memory.len() as u64, REPETITIONS, "{containers}");
    assert!(memory.iter().all(|m| m.as_f64().unwrap() > 0.0), "{containers}");

    // Every container this home made is gone (its label: the home's canonical path, hashed).
    let canonical = home.path().canonicalize().unwrap();
    let label: String = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let left = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label=airlock.home={label}"), "--format", "{{.Names}}"])
        .output()
        .unwrap();
    assert!(left.status.success());
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty(), "left behind: {left:?}");

    let md = std::fs::read_to_string(markdown.join("report.md")).unwrap();
    for group in ["egress", "workload", "density"] {
        assert!(md.contains(&format!("({group}.svg)")), "{group}.svg not linked: {md}");
        let svg = std::fs::read_to_string(markdown.join(format!("{group}.svg"))).unwrap();
        let bars = results.iter().filter(|r| r["group"] == group).count();
        assert_eq!(svg.matches("<rect").count(), bars, "{group}.svg: a rect per bar: {svg}");
    }
}

/// A user's workload file: a Python snippet timed on both tiers, a command
/// in the container, a snippet the isolate cannot run (skipped with the
/// reason, not failed), and a wrong `expect` that fails the run. Then
/// `bench compare` of two runs: matched by name, with a verdict.
#[test]
fn a_workload_file_runs_on_both_tiers_and_two_runs_compare() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let workload = out.path().join("work.toml");
    std::fs::write(
        &workload,
        r#"
[defaults]
warmup = 1
repetitions = 5

[[task]]
name = "squares"
language = "python"
code = "print(sum(i * i for i in range(1000)))"
expect = "332833500"

[[task]]
name = "lines"
command = ["bash", "-c", "seq 7 | wc -l"]
expect = "7"

[[task]]
name = "shell-out"
language = "python"
code = "import subprocess\nprint(subprocess.run(['echo', 'hi'], capture_output=True, text=True).stdout.strip())"
expect = "hi"
"#,
    )
    .unwrap();
    let run = |json: &std::path::Path| {
        airlock()
            .args(["bench", "--workload"])
            .arg(&workload)
            .arg("--json")
            .arg(json)
            .arg("--home")
            .arg(home.path())
            .output()
            .unwrap()
    };
    let (a, b) = (out.path().join("a.json"), out.path().join("b.json"));
    for path in [&a, &b] {
        let output = run(path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}\n{}", String::from_utf8_lossy(&output.stdout));
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&a).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    let by_name = |name: &str| results.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name}: {report}"));
    for (name, tier) in [("squares-isolate", "isolate"), ("squares-container", "container/runc"), ("lines-container", "container/runc")] {
        let result = by_name(name);
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["tier"], tier, "{result}");
        assert_eq!(result["samples_ms"].as_array().unwrap().len(), 5, "{result}");
        assert_eq!(result["stats"]["samples"], 5, "{result}");
        assert_eq!(result["group"], "user", "{result}");
    }
    let skipped = by_name("shell-out-isolate");
    assert_eq!(skipped["status"], "skipped", "{skipped}");
    assert!(skipped["reason"].as_str().unwrap().contains("cannot run it"), "{skipped}");
    assert_eq!(by_name("shell-out-container")["status"], "ok");
    assert_eq!(results.len(), 5, "only the file's tasks run: {report}");

    let compare = airlock().args(["bench", "compare"]).arg(&a).arg(&b).output().unwrap();
    let table = String::from_utf8_lossy(&compare.stdout);
    assert!(compare.status.success(), "{table}\n{}", String::from_utf8_lossy(&compare.stderr));
    for name in ["squares-isolate", "squares-container", "lines-container", "shell-out-container"] {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {table}"));
        assert!(
            ["faster", "SLOWER", "no difference"].iter().any(|v| line.contains(v)),
            "a verdict for {name}: {line}"
        );
    }

    // A wrong expectation is a failed result and a failed run, naming what it printed.
    std::fs::write(&workload, "[[task]]\nname = \"wrong\"\nlanguage = \"python\"\ncode = \"print(1)\"\nexpect = \"2\"\ntiers = [\"isolate\"]\nrepetitions = 2\n").unwrap();
    let failed = run(&out.path().join("c.json"));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(stderr.contains("wrong-isolate") && stderr.contains("expected \"2\""), "{stderr}");
    // A bad file is refused before anything runs.
    std::fs::write(&workload, "[[task]]\nname = \"x\"\ncode = \"1\"\n").unwrap();
    let refused = run(&out.path().join("d.json"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs a language"));
}
