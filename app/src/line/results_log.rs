//! The results log: one JSON line per image, appended and flushed to disk before the image is moved or reported
//! anywhere. It is also what makes scoring exactly-once across restarts (the ids it holds are the images already
//! decided) and the queue every sink delivers from (each keeps its own position in it).
//!
//! Each line goes out in one `write` and ends with a newline, so a kill leaves whole lines; only a power cut
//! can leave a torn last line, which opening the log cuts off (that image is then scored again).

use anyhow::{Context, Result};
use loupe_engine::atomic_file::open_append_only;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Longest line the log holds; a longer one is not Loupe's and stops the reading with a clear error.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

pub struct ResultsLog {
    path: PathBuf,
    file: File,
}

/// What an existing log says: the ids it decided with their verdicts, and lines that are not results
/// (skipped, reported).
pub struct Recovered {
    pub decided: HashMap<String, String>,
    pub unreadable_lines: usize,
    pub torn_tail_bytes: u64,
}

impl ResultsLog {
    /// Opens (or creates) the log at `path` for appending, after reading back the ids it already holds.
    pub fn open(path: &Path) -> Result<(ResultsLog, Recovered)> {
        let mut file = open_append_only(path).context("cannot open the results log")?;
        let mut recovered = Recovered { decided: HashMap::new(), unreadable_lines: 0, torn_tail_bytes: 0 };
        let mut whole_bytes = 0u64;
        let mut reader = BufReader::new(&mut file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                if line.len() > MAX_LINE_BYTES {
                    anyhow::bail!(
                        "{}: a line longer than {MAX_LINE_BYTES} bytes; not a Loupe results log",
                        path.display()
                    );
                }
                recovered.torn_tail_bytes = line.len() as u64;
                break;
            }
            whole_bytes += line.len() as u64;
            match serde_json::from_slice::<serde_json::Value>(&line) {
                Ok(value) => {
                    if let Some(id) = value.get("id").and_then(|id| id.as_str()) {
                        let verdict = value.get("verdict").and_then(|v| v.as_str()).unwrap_or_default();
                        recovered.decided.insert(id.to_string(), verdict.to_string());
                    }
                }
                Err(_) => recovered.unreadable_lines += 1,
            }
        }
        drop(reader);
        if recovered.torn_tail_bytes > 0 {
            file.set_len(whole_bytes).with_context(|| format!("{}: cannot cut the torn last line", path.display()))?;
        }
        file.seek(std::io::SeekFrom::End(0))?;
        Ok((ResultsLog { path: path.to_path_buf(), file }, recovered))
    }

    /// Appends `record` as one line and waits until it is on disk.
    pub fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file.write_all(&line).with_context(|| format!("{}: cannot append", self.path.display()))?;
        self.file.sync_data().with_context(|| format!("{}: cannot flush to disk", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads whole lines of the log from byte `offset` on (at most `limit` of them): each with the offset just past
/// it. A sink's delivery position moves along these.
pub fn lines_from(path: &Path, offset: u64, limit: usize) -> Result<Vec<(String, u64)>> {
    let mut file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut lines = Vec::new();
    let mut position = offset;
    let mut line = Vec::new();
    while lines.len() < limit {
        line.clear();
        let read = (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
        if read == 0 || line.last() != Some(&b'\n') {
            break;
        }
        position += read as u64;
        lines.push((String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(), position));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_recovers_ids_and_cuts_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("loupe-results-log-{}", std::process::id()));
        let path = dir.join("results.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let (mut log, recovered) = ResultsLog::open(&path).unwrap();
        assert!(recovered.decided.is_empty());
        log.append(&serde_json::json!({"id": "a", "score": 1.0})).unwrap();
        log.append(&serde_json::json!({"id": "b", "score": 2.0})).unwrap();
        drop(log);
        let whole = std::fs::metadata(&path).unwrap().len();
        // A power cut in the middle of the third line.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"id\": \"c\", \"sc").unwrap();
        let (mut log, recovered) = ResultsLog::open(&path).unwrap();
        let ids: Vec<&String> = recovered.decided.keys().collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(recovered.decided.contains_key("a") && recovered.decided.contains_key("b"));
        assert_eq!(recovered.torn_tail_bytes, 15);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        log.append(&serde_json::json!({"id": "c"})).unwrap();
        let lines = lines_from(&path, 0, 10).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].0, r#"{"id":"c"}"#);
        assert_eq!(lines_from(&path, lines[0].1, 1).unwrap()[0].0, lines[1].0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
