//! Atomic file writes: a temp file beside the target, fsync, rename, fsync of the folder. A crash leaves either
//! the old file or the new one, never a torn one. Each write has its own temp file, created exclusively (process
//! id and a counter in its name), so two writers of one target — two threads, two Loupe processes — never share
//! one: the last rename wins, whole.

use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Numbers this process's temp files.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Folders in which this process's writes fail, as on a full disk or a read-only share. For tests of what the
/// studio does when a save is refused: CI runs as root, which file permissions cannot stop.
static REFUSED_FOLDERS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes every write into `folder` fail (`refuse`), or succeed again. Tests only.
#[doc(hidden)]
pub fn refuse_writes_in(folder: &Path, refuse: bool) {
    let mut folders = REFUSED_FOLDERS.lock().unwrap_or_else(|p| p.into_inner());
    folders.retain(|f| f != folder);
    if refuse {
        folders.push(folder.to_path_buf());
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| Ok(file.write_all(bytes)?))
}

/// [`write_atomic`] for content too large to hold twice: `write` streams it into the temp file.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(folder).with_context(|| format!("{}: cannot create folder", folder.display()))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let number = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = folder.join(format!(".{file_name}.{}-{number}.tmp", std::process::id()));
    if REFUSED_FOLDERS.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|f| folder.starts_with(f)) {
        anyhow::bail!("{}: cannot create (writes into {} are refused)", temp.display(), folder.display());
    }
    // Exclusive: a leftover of a crashed writer (or anything else) under this name is never written into.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .with_context(|| format!("{}: cannot create", temp.display()))?;
    let result = (|| -> Result<()> {
        write(&mut file).with_context(|| format!("{}: write failed", temp.display()))?;
        file.sync_all().with_context(|| format!("{}: fsync failed", temp.display()))?;
        fs::rename(&temp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
        if let Ok(dir) = File::open(folder) {
            // Makes the rename itself durable; not every platform can fsync a folder.
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Opens (creating it if needed) an append-only log for reading and appending: the one kind of file that is not
/// replaced whole. Its writer keeps it torn-free by appending each record in one `write` and syncing it (the
/// line runtime's results log).
pub fn open_append_only(path: &Path) -> Result<File> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(folder).with_context(|| format!("{}: cannot create folder", folder.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))
}

/// Encodes `image` in the format its extension names (PNG for masks and heatmaps) and writes it atomically.
pub fn write_image_atomic(path: &Path, image: &image::DynamicImage) -> Result<()> {
    let format = image::ImageFormat::from_path(path).unwrap_or(image::ImageFormat::Png);
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .with_context(|| format!("{}: cannot encode", path.display()))?;
    write_atomic(path, &bytes)
}

/// Copies `from` to `to` atomically (reads it whole: images and masks, not archives).
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("{}: cannot read", from.display()))?;
    write_atomic(to, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("loupe-atomic-{}", std::process::id()));
        let path = dir.join("a.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    /// Every file Loupe writes goes through this module (ARCHITECTURE.md says so): no other non-test code of the
    /// engine or the app opens a file for writing by itself.
    #[test]
    fn nothing_else_writes_files_directly() {
        fn visit(dir: &Path, offenders: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, offenders);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("atomic_file.rs") {
                    let text = fs::read_to_string(&path).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                    for (number, line) in code.lines().enumerate() {
                        let direct =
                            ["fs::write(", "File::create(", "fs::copy(", "OpenOptions::new(", "save_with_format("];
                        if direct.iter().any(|call| line.contains(call)) && !line.trim_start().starts_with("//") {
                            offenders.push(format!("{}:{}: {}", path.display(), number + 1, line.trim()));
                        }
                    }
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut offenders = Vec::new();
        visit(&root.join("src"), &mut offenders);
        visit(&root.join("../app/src"), &mut offenders);
        assert!(offenders.is_empty(), "files written without write_atomic:\n{}", offenders.join("\n"));
    }

    #[test]
    fn concurrent_writers_of_one_target_never_tear_it() {
        let dir = std::env::temp_dir().join(format!("loupe-atomic-race-{}", std::process::id()));
        let path = dir.join("shared.bin");
        let contents: Vec<Vec<u8>> = (0..2u8).map(|t| vec![b'a' + t; 256 << 10]).collect();
        std::thread::scope(|scope| {
            let all = &contents;
            for content in all {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..50 {
                        write_atomic(path, content).unwrap();
                        let read = fs::read(path).unwrap();
                        assert!(all.contains(&read), "a torn file of {} bytes", read.len());
                    }
                });
            }
        });
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left behind");
        fs::remove_dir_all(dir).unwrap();
    }
}
