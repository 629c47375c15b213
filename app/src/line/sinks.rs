//! Where results go besides the log: a webhook (HTTP POST) or an MQTT topic. Each sink delivers from the results
//! log itself, in order, keeping its position (a byte offset) in a small file next to the log. A sink that is
//! down delays nothing and loses nothing: scoring goes on, the log grows, and the sink catches up when it
//! returns. A result is delivered again only when Loupe stops between the receiver's acknowledgement and the
//! saved position; every line carries its `id` for a receiver that must drop such a repeat.

use super::results_log::lines_from;
use anyhow::{Context, Result};
use loupe_engine::atomic_file::write_atomic;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest wait between two tries of a sink that is down.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Lines read from the log per pass.
const BATCH_LINES: usize = 256;

/// One destination for result lines.
pub trait Sink: Send {
    /// Names the sink in messages and in its position file (`<log>.<name>.position`).
    fn name(&self) -> String;
    /// Delivers one JSON line; returns once the receiver acknowledged it (HTTP 2xx, MQTT PUBACK).
    fn deliver(&mut self, line: &str) -> Result<()>;
}

/// HTTP POST of each result's JSON to a URL (a webhook).
pub struct Webhook {
    url: String,
    agent: ureq::Agent,
}

impl Webhook {
    pub fn new(url: &str) -> Webhook {
        let config = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build();
        Webhook { url: url.to_string(), agent: config.into() }
    }
}

impl Sink for Webhook {
    fn name(&self) -> String {
        "webhook".into()
    }

    fn deliver(&mut self, line: &str) -> Result<()> {
        self.agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(line)
            .with_context(|| format!("POST {}", self.url))?;
        Ok(())
    }
}

/// MQTT publish (QoS 1: delivered once the broker's PUBACK comes) of each result's JSON to a topic.
pub struct Mqtt {
    host: String,
    port: u16,
    topic: String,
    /// The connection, opened on first use and dropped after any failure: a fresh one never re-sends what the
    /// old one had in flight, so the retry of a line is its only second copy.
    session: Option<(rumqttc::Client, rumqttc::Connection)>,
}

/// How long one publish may wait for its acknowledgement.
const MQTT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

impl Mqtt {
    /// From `mqtt://HOST[:PORT]/TOPIC` (port 1883 when absent).
    pub fn from_url(url: &str) -> Result<Mqtt> {
        let rest = url.strip_prefix("mqtt://").context("an MQTT sink is mqtt://HOST[:PORT]/TOPIC")?;
        let (address, topic) = rest.split_once('/').context("the MQTT URL names no topic: mqtt://HOST[:PORT]/TOPIC")?;
        if topic.is_empty() || topic.contains(['+', '#']) {
            anyhow::bail!("{url}: the topic must be a plain topic name (no wildcards)");
        }
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().with_context(|| format!("{url}: {port:?} is not a port"))?),
            None => (address, 1883),
        };
        Ok(Mqtt { host: host.to_string(), port, topic: topic.to_string(), session: None })
    }

    fn publish(&mut self, line: &str) -> Result<()> {
        let (client, connection) = self.session.get_or_insert_with(|| {
            let mut options =
                rumqttc::MqttOptions::new(format!("loupe-watch-{}", std::process::id()), &self.host, self.port);
            options.set_keep_alive(Duration::from_secs(15));
            rumqttc::Client::new(options, 16)
        });
        client.publish(&self.topic, rumqttc::QoS::AtLeastOnce, false, line.as_bytes().to_vec())?;
        let deadline = std::time::Instant::now() + MQTT_ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match connection.recv_timeout(left) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => anyhow::bail!("mqtt://{}:{}: {error}", self.host, self.port),
                Err(_) => {
                    anyhow::bail!("mqtt://{}:{}: no acknowledgement within {MQTT_ACK_TIMEOUT:?}", self.host, self.port)
                }
            }
        }
    }
}

impl Sink for Mqtt {
    fn name(&self) -> String {
        "mqtt".into()
    }

    fn deliver(&mut self, line: &str) -> Result<()> {
        let result = self.publish(line);
        if result.is_err() {
            self.session = None;
        }
        result
    }
}

/// A sink's delivery thread and how to wake or stop it.
pub struct Delivery {
    pub name: String,
    wake: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Delivery {
    /// New lines are in the log.
    pub fn wake(&self) {
        let _ = self.wake.send(());
    }

    pub fn join(self) {
        let _ = self.wake.send(());
        let _ = self.thread.join();
    }
}

/// Where `sink` keeps its position in the log at `log`.
fn position_file(log: &Path, sink: &str) -> PathBuf {
    let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    log.with_file_name(format!("{name}.{sink}.position"))
}

/// The byte offset in the log up to which `sink` delivered (0 when it never did).
pub fn delivered_up_to(log: &Path, sink: &str) -> u64 {
    std::fs::read_to_string(position_file(log, sink)).ok().and_then(|text| text.trim().parse().ok()).unwrap_or(0)
}

/// Starts delivering the log at `log` to `sink` from where it stopped last time, until `stop` is set and every
/// line is delivered (or `stop` is set while the sink is down: what is left waits for the next run).
pub fn start(mut sink: Box<dyn Sink>, log: &Path, stop: Arc<AtomicBool>) -> Delivery {
    let (wake, woken) = mpsc::channel::<()>();
    let name = sink.name();
    let log = log.to_path_buf();
    let thread_name = name.clone();
    let thread = std::thread::spawn(move || {
        let position_path = position_file(&log, &thread_name);
        let mut position = delivered_up_to(&log, &thread_name);
        let mut retry_delay = Duration::from_millis(100);
        let mut down_since_reported = false;
        loop {
            // Read before reading the log: lines written before the stop are then all in this pass.
            let stopping = stop.load(Ordering::Relaxed);
            let lines = match lines_from(&log, position, BATCH_LINES) {
                Ok(lines) => lines,
                Err(error) => {
                    eprintln!("{thread_name}: cannot read the results log: {error:#}");
                    Vec::new()
                }
            };
            let mut failed = false;
            for (line, end) in &lines {
                if let Err(error) = sink.deliver(line) {
                    if !down_since_reported {
                        eprintln!("{thread_name}: not delivered, will retry (results wait in the log): {error:#}");
                        down_since_reported = true;
                    }
                    failed = true;
                    break;
                }
                if down_since_reported {
                    eprintln!("{thread_name}: delivering again");
                    down_since_reported = false;
                }
                position = *end;
                retry_delay = Duration::from_millis(100);
                if let Err(error) = write_atomic(&position_path, position.to_string().as_bytes()) {
                    eprintln!("{thread_name}: cannot save the delivery position: {error:#}");
                }
            }
            if failed {
                if stopping {
                    return;
                }
                let _ = woken.recv_timeout(retry_delay);
                retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
            } else if lines.len() < BATCH_LINES {
                if stopping {
                    return;
                }
                // Up to date: sleep until new lines are written (or look again now and then).
                let _ = woken.recv_timeout(Duration::from_millis(500));
            }
        }
    });
    Delivery { name, wake, thread }
}
