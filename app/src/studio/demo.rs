//! Where the studio keeps its own files, and the demo project it opens on a first start.

use crate::project::Project;
use anyhow::{Context, Result};
use loupe_engine::atomic_file::write_atomic;
use std::path::PathBuf;

/// The example project, embedded so a fresh install has something real to show.
pub const DEMO_PROJECT: &str = include_str!("../../../projects/demo.ron");

/// `$LOUPE_HOME`, else `$XDG_DATA_HOME/loupe`, else `~/.local/share/loupe`.
pub fn data_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("LOUPE_HOME") {
        return PathBuf::from(home);
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(data).join("loupe");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".local/share/loupe")
}

/// The user's copy of the demo project, written on first use.
pub fn ensure_demo_project() -> Result<PathBuf> {
    let path = data_dir().join("demo").join("demo.ron");
    if !path.exists() {
        // Parse first: a broken embedded example must fail here, not as a corrupt project later.
        Project::from_ron(DEMO_PROJECT).context("the embedded demo project")?;
        std::fs::create_dir_all(path.parent().expect("has a parent"))
            .with_context(|| format!("{}: cannot create", data_dir().display()))?;
        write_atomic(&path, DEMO_PROJECT.as_bytes())?;
    }
    Ok(path)
}

fn last_project_record() -> PathBuf {
    data_dir().join("last-project")
}

pub fn last_project() -> Option<PathBuf> {
    let text = std::fs::read_to_string(last_project_record()).ok()?;
    let path = PathBuf::from(text.trim());
    path.is_file().then_some(path)
}

pub fn remember_last_project(path: &std::path::Path) {
    let record = last_project_record();
    if std::fs::create_dir_all(data_dir()).is_ok() {
        // Best effort: forgetting the last project only means the demo opens next time.
        let _ = write_atomic(&record, path.display().to_string().as_bytes());
    }
}

/// The project the window opens with: the one asked for, else the last one, else the demo project (else an
/// empty one); with the errors met on the way, for the banner.
pub fn first_project(requested: Option<PathBuf>) -> (Project, PathBuf, Vec<String>) {
    let mut errors = Vec::new();
    let opened = match requested.clone().or_else(last_project) {
        Some(path) => Project::load(&path).map(|p| (p, path)),
        None => Err(anyhow::anyhow!("no project yet")),
    };
    let (project, path) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            if requested.is_some() {
                errors.push(format!("{error:#} — the file was left untouched; the demo project is open instead."));
            }
            match ensure_demo_project().and_then(|path| Ok((Project::load(&path)?, path))) {
                Ok(opened) => opened,
                Err(error) => {
                    errors.push(format!("cannot open the demo project: {error:#}"));
                    (Project::new("untitled"), std::env::temp_dir().join("loupe-untitled.ron"))
                }
            }
        }
    };
    (project, path, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_demo_project_parses() {
        let project = Project::from_ron(DEMO_PROJECT).unwrap();
        assert_eq!(project.sources.len(), 1);
        assert!(project.models.is_empty());
    }
}
