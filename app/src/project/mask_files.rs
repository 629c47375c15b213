//! Where the project keeps the masks a labeller paints: one file per saved revision under `masks/`, named so
//! that no label key (a path from someone else's project file) can point it outside the project.

use std::path::{Path, PathBuf};

/// The file the mask of label `key` is written to in its version `version` (unique per write), relative to the
/// project folder: under `masks/`, whatever the key holds (only its plain names are used: no root, no `..`, no
/// drive).
pub fn mask_file(key: &str, version: &str) -> PathBuf {
    let mut path = PathBuf::from("masks");
    for part in key.split(['/', '\\']) {
        let mut components = Path::new(part).components();
        if let (Some(std::path::Component::Normal(name)), None) = (components.next(), components.next()) {
            path.push(name);
        }
    }
    let name = path.file_name().filter(|_| path != Path::new("masks")).map(|n| n.to_string_lossy().into_owned());
    path.set_file_name(format!("{}.{version}.png", name.as_deref().unwrap_or("mask")));
    if path.parent() == Some(Path::new("")) {
        path = Path::new("masks").join(path);
    }
    path
}

/// Whether `path` (from a project file) is a mask file Loupe wrote inside the project: only those are ever
/// deleted when a newer revision replaces them.
pub fn is_own_mask_file(path: &Path) -> bool {
    let mut components = path.components();
    components.next() == Some(std::path::Component::Normal("masks".as_ref()))
        && components.all(|c| matches!(c, std::path::Component::Normal(_)))
        && path.extension().is_some_and(|e| e == "png")
}

/// A stamp that differs between sessions (and from an earlier import), for file names written once.
pub fn session_stamp() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}", now.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_files_stay_under_masks_whatever_the_key() {
        assert_eq!(mask_file("tiles/test/crack/000.png", "a-3"), Path::new("masks/tiles/test/crack/000.png.a-3.png"));
        for key in ["/../../etc/passwd", "../x", "/", "", "a/../../b", "C:\\evil\\x"] {
            let file = mask_file(key, "1");
            assert!(is_own_mask_file(&file), "{key:?} gives {}", file.display());
            assert!(!file.components().any(|c| c == std::path::Component::ParentDir), "{}", file.display());
        }
        assert_eq!(mask_file("/../../etc/passwd", "1"), Path::new("masks/etc/passwd.1.png"));
        assert!(!is_own_mask_file(Path::new("/etc/passwd")));
        assert!(!is_own_mask_file(Path::new("masks/../project.ron")));
    }
}
