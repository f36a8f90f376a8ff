//! `airlock bench` end to end: the real binary runs a small quick subset in a
//! temporary home (an isolate cold start, an evaluation in a context, the
//! paired HTTP case, a warm container command, the staggered TTI mode and the
//! docker exec peer),
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
