//! `loupe watch`, the line runtime, as a line uses it: images dropped into a folder by a camera (renamed into
//! place), the process killed with SIGKILL and restarted, a webhook that goes down and comes back.

use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn loupe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loupe"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-watch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A PaDiM model (with the threshold fit chose on held-out good images) and the synthetic set it came from.
fn fitted(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(3)).unwrap();
    let model = dir.join("model.safetensors");
    let fit = loupe()
        .args(["fit", "--method", "padim", "--data", text(&data), "--out", text(&model), "--image-size", "96"])
        .output()
        .unwrap();
    assert!(fit.status.success(), "{}", String::from_utf8_lossy(&fit.stderr));
    (model, data)
}

/// Test images of the synthetic set: good ones and defects, named by folder so names stay unique.
fn test_images(data: &Path) -> Vec<(String, PathBuf)> {
    let mut images = Vec::new();
    for folder in std::fs::read_dir(data.join("test")).unwrap().flatten() {
        for file in std::fs::read_dir(folder.path()).unwrap().flatten() {
            let name = format!("{}_{}", folder.file_name().to_string_lossy(), file.file_name().to_string_lossy());
            images.push((name, file.path()));
        }
    }
    images.sort();
    images
}

/// Drops `bytes` into `inbox` as a camera does: written under a hidden name, then renamed into place.
fn drop_file(inbox: &Path, name: &str, bytes: &[u8]) {
    let hidden = inbox.join(format!(".{name}.part"));
    std::fs::write(&hidden, bytes).unwrap();
    std::fs::rename(hidden, inbox.join(name)).unwrap();
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    assert!(text.is_empty() || text.ends_with('\n'), "a torn line in {}", path.display());
    text.lines().map(|line| serde_json::from_str(line).expect("each line whole JSON")).collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn watch(model: &Path, inbox: &Path, extra: &[&str]) -> Child {
    loupe()
        .args(["watch", "--model", text(model), "--input", text(inbox), "--settle-ms", "300"])
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn every_image_is_decided_once_across_a_kill_and_a_restart() {
    let dir = temp_dir("restart");
    let (model, data) = fitted(&dir);
    let (inbox, sorted) = (dir.join("inbox"), dir.join("sorted"));
    std::fs::create_dir_all(&inbox).unwrap();
    let log = inbox.join(".loupe/results.jsonl");
    let images = test_images(&data);
    let (first, second) = images.split_at(images.len() / 2);
    let sort = ["--sort-into", text(&sorted)];

    let mut running = watch(&model, &inbox, &sort);
    for (name, path) in first {
        drop_file(&inbox, name, &std::fs::read(path).unwrap());
    }
    // Killed mid-run: some images decided, others still waiting.
    wait_for("the first results", Duration::from_secs(60), || lines(&log).len() >= 3);
    running.kill().unwrap();
    running.wait().unwrap();

    // While it is down: more images, a file that is not an image, and a truncated PNG.
    for (name, path) in second {
        drop_file(&inbox, name, &std::fs::read(path).unwrap());
    }
    drop_file(&inbox, "notes.png", b"this is not an image");
    let png = std::fs::read(&first[0].1).unwrap();
    drop_file(&inbox, "cut.png", &png[..png.len() / 2]);
    let expected = images.len() + 2;

    let restarted =
        watch(&model, &inbox, &[&sort[..], &["--exit-when-idle", "2"]].concat()).wait_with_output().unwrap();
    assert!(restarted.status.success());

    let results = lines(&log);
    let files: Vec<&str> = results.iter().map(|r| r["file"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = files.iter().copied().collect();
    assert_eq!(files.len(), expected, "each image exactly once: {files:?}");
    assert_eq!(unique.len(), expected);
    let mut by_verdict: BTreeMap<String, usize> = BTreeMap::new();
    for result in &results {
        let verdict = result["verdict"].as_str().unwrap();
        *by_verdict.entry(verdict.to_string()).or_default() += 1;
        assert!(sorted.join(verdict).join(result["file"].as_str().unwrap()).is_file(), "{result} not sorted");
        for key in ["time", "model", "decision_threshold", "latency_ms", "id"] {
            assert!(!result[key].is_null(), "{key} missing in {result}");
        }
    }
    assert_eq!(by_verdict.get("unreadable"), Some(&2), "{by_verdict:?}");
    let reason = |file: &str| results.iter().find(|r| r["file"] == file).unwrap()["reason"].to_string();
    assert!(reason("notes.png").contains("not") || reason("notes.png").contains("format"), "{}", reason("notes.png"));
    assert!(!reason("cut.png").is_empty());
    // Most defects are rejected, most good parts pass (the model is small; this checks the verdicts are real).
    let rejected_defects =
        results.iter().filter(|r| !r["file"].as_str().unwrap().starts_with("good") && r["verdict"] == "reject").count();
    assert!(rejected_defects >= 6, "{by_verdict:?}");
    // The inbox holds nothing but the state folder.
    let left: Vec<_> = std::fs::read_dir(&inbox).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from(".loupe")]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A receiver started from `script` (tests/webhook_server.py, tests/mqtt_broker.py) on `port` (0: a free one),
/// recording what it receives in `received`; returns it with its port.
fn receiver(script: &str, received: &Path, port: u16) -> (Child, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests").join(script);
    let mut server = Command::new("python3")
        .arg(&script)
        .arg(received)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut first_line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
    let port = first_line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{script:?} did not start (pip install -r tests/requirements.txt)"));
    (server, port)
}

/// Scores images while the receiver of `sink` (the `--webhook` or `--mqtt` value built from the port) is up,
/// down, and up again: scoring never waits, and every result reaches it once, in order.
fn sink_outage_loses_nothing(script: &str, sink_option: &str, url: impl Fn(u16) -> String) {
    let dir = temp_dir(sink_option.trim_start_matches('-'));
    let (model, data) = fitted(&dir);
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let log = inbox.join(".loupe/results.jsonl");
    let received = dir.join("received.jsonl");
    let (mut server, port) = receiver(script, &received, 0);
    let running = watch(&model, &inbox, &[sink_option, &url(port), "--exit-when-idle", "6"]);
    let images = test_images(&data);
    let (before, during) = (&images[..4], &images[4..10]);
    for (name, path) in before {
        drop_file(&inbox, name, &std::fs::read(path).unwrap());
    }
    wait_for("the first deliveries", Duration::from_secs(60), || lines(&received).len() == before.len());

    server.kill().unwrap();
    server.wait().unwrap();
    for (name, path) in during {
        drop_file(&inbox, name, &std::fs::read(path).unwrap());
    }
    // Scoring goes on while the receiver is down.
    wait_for("scoring during the outage", Duration::from_secs(60), || lines(&log).len() == 10);
    let (mut server, _) = receiver(script, &received, port);
    wait_for("delivery after the outage", Duration::from_secs(60), || lines(&received).len() >= 10);
    let finished = running.wait_with_output().unwrap();
    assert!(finished.status.success());
    server.kill().unwrap();

    let ids = |values: Vec<serde_json::Value>| -> Vec<String> {
        values.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids(lines(&received)), ids(lines(&log)), "every result once, in order");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_webhook_that_goes_down_gets_every_result_once_when_it_returns() {
    sink_outage_loses_nothing("webhook_server.py", "--webhook", |port| format!("http://127.0.0.1:{port}/results"));
}

#[test]
fn an_mqtt_broker_that_goes_down_gets_every_result_once_when_it_returns() {
    sink_outage_loses_nothing("mqtt_broker.py", "--mqtt", |port| format!("mqtt://127.0.0.1:{port}/line1/results"));
}
