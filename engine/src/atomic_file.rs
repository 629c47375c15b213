//! Atomic file writes: a temp file beside the target, fsync, rename, fsync of the folder. A crash leaves either
//! the old file or the new one, never a torn one.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(folder).with_context(|| format!("{}: cannot create folder", folder.display()))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = folder.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file = File::create(&temp).with_context(|| format!("{}: cannot create", temp.display()))?;
        file.write_all(bytes).with_context(|| format!("{}: write failed", temp.display()))?;
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
}
