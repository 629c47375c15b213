//! The folder a camera drops images into, and when each image in it is whole.
//!
//! A file counts as complete when the writer has closed it or renamed it into place (inotify's close-write and
//! moved-to, through `notify`), or else when its size and modification time have not changed for the settle
//! time (network shares and writers that keep the file open). Hidden files (`.name`, the usual temp name of a
//! rename-into-place) and files that are not images are never taken. Only the folder's own files are watched,
//! not its subfolders, so sorted `pass/ review/ reject/` folders may live inside it.

use anyhow::{Context, Result};
use loupe_engine::dataset::layout::is_image;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// One complete image in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub path: PathBuf,
    pub size: u64,
    pub modified: SystemTime,
}

impl Arrival {
    /// What identifies this image across restarts: its name, size and modification time (a camera that
    /// restarts its counter and reuses a name writes a different file, which is scored again).
    pub fn id(&self) -> String {
        let nanos = self.modified.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("{}|{}|{nanos}", self.file_name(), self.size)
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// A file seen while it may still be written.
struct Observation {
    size: u64,
    modified: SystemTime,
    unchanged_since: Instant,
}

pub struct Inbox {
    dir: PathBuf,
    settle: Duration,
    events: mpsc::Receiver<notify::Result<notify::Event>>,
    _watcher: notify::RecommendedWatcher,
    pending: HashMap<PathBuf, Observation>,
    /// Files whose writer closed them or renamed them in since they were last looked at.
    finished_writing: HashSet<PathBuf>,
}

impl Inbox {
    pub fn open(dir: &Path, settle: Duration) -> Result<Inbox> {
        if !dir.is_dir() {
            anyhow::bail!("{}: no such folder", dir.display());
        }
        let (sender, events) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = sender.send(event);
        })
        .context("cannot watch folders on this system")?;
        watcher.watch(dir, RecursiveMode::NonRecursive).with_context(|| format!("{}: cannot watch", dir.display()))?;
        Ok(Inbox {
            dir: dir.to_path_buf(),
            settle,
            events,
            _watcher: watcher,
            pending: HashMap::new(),
            finished_writing: HashSet::new(),
        })
    }

    /// Waits up to `timeout` for news, then returns the images that are complete now and not `done`, oldest
    /// first (modification time, then name): the order they arrived in, also for a backlog found at start.
    pub fn complete(&mut self, timeout: Duration, done: impl Fn(&Arrival) -> bool) -> Result<Vec<Arrival>> {
        self.take_events(timeout);
        let now = Instant::now();
        let mut complete = Vec::new();
        let mut present = HashSet::new();
        let entries = std::fs::read_dir(&self.dir).with_context(|| format!("{}: cannot list", self.dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            let Ok(metadata) = entry.metadata() else { continue };
            if hidden || !metadata.is_file() || !is_image(&path) {
                continue;
            }
            present.insert(path.clone());
            let (size, modified) = (metadata.len(), metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let arrival = Arrival { path: path.clone(), size, modified };
            if done(&arrival) {
                self.pending.remove(&path);
                continue;
            }
            let closed = self.finished_writing.remove(&path);
            let observation =
                self.pending.entry(path.clone()).or_insert(Observation { size, modified, unchanged_since: now });
            if (observation.size, observation.modified) != (size, modified) {
                *observation = Observation { size, modified, unchanged_since: now };
            }
            if closed || now.duration_since(observation.unchanged_since) >= self.settle {
                self.pending.remove(&path);
                complete.push(arrival);
            }
        }
        self.pending.retain(|path, _| present.contains(path));
        self.finished_writing.retain(|path| present.contains(path));
        complete.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
        Ok(complete)
    }

    /// Whether some file is still waiting to settle (the caller then looks again within the settle time).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn take_events(&mut self, timeout: Duration) {
        let mut next = self.events.recv_timeout(timeout).ok();
        while let Some(event) = next {
            if let Ok(event) = event {
                let finished = matches!(
                    event.kind,
                    EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write))
                        | EventKind::Modify(notify::event::ModifyKind::Name(_))
                );
                if finished {
                    self.finished_writing.extend(event.paths);
                }
            }
            next = self.events.try_recv().ok();
        }
    }
}
