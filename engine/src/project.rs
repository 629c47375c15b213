//! The project file: a RON document listing where the images come from, the trained models with their chosen
//! thresholds, and their latest evaluation. Paths inside are relative to the project's folder when they can be,
//! so a project folder can be moved or handed over whole.

use crate::atomic_file::write_atomic;
use crate::evaluate::EvalReport;
use crate::geometry::InputGeometry;
use crate::labels::LabelSet;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
/// Project files larger than this are refused before parsing: no legitimate project comes near it.
const MAX_PROJECT_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub sources: Vec<Source>,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Index into `models` of the model the gallery, inspector and threshold panel show.
    #[serde(default)]
    pub active_model: Option<usize>,
    #[serde(default)]
    pub training: TrainingChoice,
    /// The labeller's verdicts, defect types and masks, by `labels::label_key`.
    #[serde(default)]
    pub labels: LabelSet,
    /// The project's defect types, in the order the labeller made them.
    #[serde(default)]
    pub defect_types: Vec<String>,
    /// Images pinned for presenting (the presentation mode's hand-picked playlist), by label key, in order.
    #[serde(default)]
    pub pinned: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Source {
    /// A folder of good images (searched recursively); all of them train.
    NormalFolder(PathBuf),
    /// An MVTec AD category: `train/good` trains, `test/<type>` (with `ground_truth/<type>` masks) evaluates.
    Benchmark(PathBuf),
    /// anomalib's Folder shape: good, defective and optional mask folders, all for evaluation.
    Folder { normal: PathBuf, abnormal: PathBuf, mask: Option<PathBuf> },
    /// A folder of new images to inspect (searched recursively): scored by the active model, labelled by the user,
    /// never trained on. Their only ground truth is the labeller's.
    Inspect(PathBuf),
    /// The engine's seeded synthetic set in MVTec layout, generated into `path` when it is missing.
    Synthetic { path: PathBuf, seed: u64, size: u32, train_good: usize, test_good: usize, test_per_defect: usize },
}

impl Source {
    /// The folder that moves when this source is relinked: the root, or a Folder layout's common parent.
    pub fn place(&self) -> &Path {
        match self {
            Source::Folder { abnormal, .. } => abnormal.parent().unwrap_or(abnormal),
            other => other.root(),
        }
    }

    /// The folder that names this source in lists and in the benchmark panel.
    pub fn root(&self) -> &Path {
        match self {
            Source::NormalFolder(path)
            | Source::Benchmark(path)
            | Source::Inspect(path)
            | Source::Synthetic { path, .. } => path,
            Source::Folder { abnormal, .. } => abnormal,
        }
    }

    pub fn kind_label(&self) -> &'static str {
        match self {
            Source::NormalFolder(_) => "normal images",
            Source::Benchmark(_) => "benchmark (MVTec layout)",
            Source::Folder { .. } => "benchmark (Folder layout)",
            Source::Inspect(_) => "images to inspect",
            Source::Synthetic { .. } => "synthetic demo set",
        }
    }

    /// The name of the folder that moves with this source, or "source" when the path has none (`/`, `x/..`):
    /// never a path, so a label key built from it stays relative. [`Project::source_names`] makes it unique.
    fn folder_name(&self) -> String {
        self.place().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "source".into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub method: String,
    /// The model file (relative to the project folder).
    pub file: PathBuf,
    /// Scores at or above are rejected.
    pub decision: Option<f32>,
    /// Scores in [review, decision) go to a person.
    pub review: Option<f32>,
    /// Latest evaluation per benchmark category (source), with every test image's score.
    #[serde(default)]
    pub evaluations: BTreeMap<String, EvalReport>,
    /// Scores of the images to inspect ([`Source::Inspect`]), by image key: they have no folder ground truth,
    /// so they are in no evaluation, but the gallery sorts them for triage.
    #[serde(default)]
    pub inspected: BTreeMap<String, f32>,
    #[serde(default)]
    pub fit_seconds: f64,
    #[serde(default)]
    pub images_used: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingChoice {
    pub method: String,
    /// Method settings as JSON text (each method owns its schema; the engine merges them over its defaults).
    pub settings_json: String,
    pub image_size: u32,
    pub device: String,
    pub target_far: f64,
    /// How the model sees each image: whole, kept aspect ratio or tiles; a region of interest.
    #[serde(default)]
    pub geometry: InputGeometry,
}

impl Default for TrainingChoice {
    fn default() -> Self {
        Self {
            method: "patchcore".into(),
            settings_json: "{}".into(),
            image_size: 256,
            device: "cpu".into(),
            target_far: 0.01,
            geometry: InputGeometry::default(),
        }
    }
}

impl Project {
    pub fn new(name: &str) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            name: name.to_string(),
            sources: Vec::new(),
            models: Vec::new(),
            active_model: None,
            training: TrainingChoice::default(),
            labels: LabelSet::new(),
            defect_types: Vec::new(),
            pinned: Vec::new(),
        }
    }

    pub fn to_ron(&self) -> Result<String> {
        let config = ron::ser::PrettyConfig::new().depth_limit(6).indentor("  ".to_string());
        ron::ser::to_string_pretty(self, config).context("cannot serialise the project")
    }

    pub fn from_ron(text: &str) -> Result<Self> {
        let project: Project = ron::from_str(text).map_err(|e| anyhow::anyhow!("not a Loupe project: {e}"))?;
        if project.format_version > FORMAT_VERSION {
            bail!(
                "written by a newer Loupe (project format {}; this build reads up to {FORMAT_VERSION})",
                project.format_version
            );
        }
        project.training.geometry.check().context("its training geometry")?;
        if let Some(active) = project.active_model {
            if active >= project.models.len() {
                bail!("active model {active} does not exist ({} models)", project.models.len());
            }
        }
        Ok(project)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let size = std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?.len();
        if size > MAX_PROJECT_BYTES {
            bail!("{}: {size} bytes is too large for a project file", path.display());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_ron(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_ron()?.as_bytes())
    }

    /// Each source's name, in source order: its folder's name, with " (2)", " (3)", … after the first when
    /// several sources' folders share a name (`lineA/images`, `lineB/images`). Label keys, mask files and the
    /// benchmark panel's categories start with it, so two sources never share labels.
    pub fn source_names(&self) -> Vec<String> {
        source_names(&self.sources)
    }

    /// Points source `index` at `new_root`, the moved folder ([`Source::place`]): a Folder-layout source's
    /// folders move with their common parent. Labels are keyed by the source's name (the folder's name): when
    /// that changes — this source's, or another's that was told apart from it —, those label keys (and nothing
    /// else) move with it.
    pub fn relink_source(&mut self, index: usize, new_root: PathBuf) -> Result<()> {
        let old_names = self.source_names();
        let Some(source) = self.sources.get_mut(index) else { bail!("there is no source {index}") };
        match source {
            Source::NormalFolder(path)
            | Source::Benchmark(path)
            | Source::Inspect(path)
            | Source::Synthetic { path, .. } => *path = new_root,
            Source::Folder { normal, abnormal, mask } => {
                let old_parent = abnormal.parent().unwrap_or(Path::new("")).to_path_buf();
                let moved = |path: &Path| -> Result<PathBuf> {
                    match path.strip_prefix(&old_parent) {
                        Ok(inside) => Ok(new_root.join(inside)),
                        Err(_) => bail!(
                            "{} is not inside {}: this Folder source's folders do not share a parent; remove it and \
                             import them again",
                            path.display(),
                            old_parent.display()
                        ),
                    }
                };
                let (new_normal, new_abnormal) = (moved(normal)?, moved(abnormal)?);
                let new_mask = mask.as_deref().map(moved).transpose()?;
                (*normal, *abnormal, *mask) = (new_normal, new_abnormal, new_mask);
            }
        }
        // Taken out first and put back after, so renames that swap names ("images" ↔ "images (2)") cannot collide.
        let renamed: Vec<(String, String)> = old_names
            .into_iter()
            .zip(self.source_names())
            .filter(|(old, new)| old != new)
            .map(|(old, new)| (format!("{old}/"), format!("{new}/")))
            .collect();
        let mut moving = Vec::new();
        for (old_prefix, new_prefix) in &renamed {
            let keys: Vec<String> = self.labels.keys().filter(|k| k.starts_with(old_prefix)).cloned().collect();
            for key in keys {
                let label = self.labels.remove(&key).expect("listed above");
                moving.push((format!("{new_prefix}{}", &key[old_prefix.len()..]), label));
            }
        }
        self.labels.extend(moving);
        // Pins are label keys too: each moves once, with the first rename that matches it.
        for pin in &mut self.pinned {
            if let Some((old, new)) = renamed.iter().find(|(old, _)| pin.starts_with(old.as_str())) {
                *pin = format!("{new}{}", &pin[old.len()..]);
            }
        }
        Ok(())
    }

    pub fn active(&self) -> Option<&ModelEntry> {
        self.active_model.and_then(|i| self.models.get(i))
    }

    pub fn active_mut(&mut self) -> Option<&mut ModelEntry> {
        self.active_model.and_then(|i| self.models.get_mut(i))
    }
}

/// [`Project::source_names`] of a list of sources.
pub fn source_names(sources: &[Source]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(sources.len());
    for source in sources {
        let base = source.folder_name();
        let mut name = base.clone();
        let mut copy = 1;
        while names.contains(&name) {
            copy += 1;
            name = format!("{base} ({copy})");
        }
        names.push(name);
    }
    names
}

/// `path` as stored in a project in `project_dir`: relative when it lies inside, absolute otherwise.
pub fn relative_to(project_dir: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(project_dir) {
        Ok(inside) if !inside.as_os_str().is_empty() => inside.to_path_buf(),
        _ => path.to_path_buf(),
    }
}

/// A path read from a project in `project_dir`, made usable.
pub fn resolve(project_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        project_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{ImageLabel, Verdict};

    fn sample() -> Project {
        let mut project = Project::new("tiles");
        project.sources.push(Source::Benchmark("data/tiles".into()));
        project.sources.push(Source::Folder { normal: "/abs/good".into(), abnormal: "/abs/bad".into(), mask: None });
        project.models.push(ModelEntry {
            name: "PatchCore 1".into(),
            method: "patchcore".into(),
            file: "models/patchcore-1.safetensors".into(),
            decision: Some(1.25),
            review: Some(0.5),
            evaluations: BTreeMap::new(),
            inspected: BTreeMap::from([("/data/new/1.png".to_string(), 0.75)]),
            fit_seconds: 3.5,
            images_used: 40,
        });
        project.active_model = Some(0);
        project.training.settings_json = r#"{"coreset_ratio":0.01}"#.into();
        project.training.geometry = InputGeometry {
            layout: crate::geometry::Layout::Tiles { tile: 512, overlap: 64 },
            region: Some(crate::geometry::Region::rectangle(10.0, 20.0, 3000.0, 2000.5)),
        };
        project.defect_types = vec!["crack".into(), "blowhole".into()];
        project.pinned = vec!["tiles/test/crack/000.png".into()];
        project.labels.insert(
            "tiles/test/crack/000.png".into(),
            crate::labels::ImageLabel {
                verdict: Some(crate::labels::Verdict::Defect),
                defect_types: vec!["crack".into()],
                mask: Some("masks/tiles/test/crack/000.png".into()),
                review: Some(crate::labels::ReviewAnswer::Accepted),
            },
        );
        project
    }

    #[test]
    fn round_trips_through_ron() {
        let project = sample();
        let text = project.to_ron().unwrap();
        assert_eq!(Project::from_ron(&text).unwrap(), project);
    }

    #[test]
    fn corrupt_or_inconsistent_files_are_errors() {
        assert!(Project::from_ron("(format_version: 1, name: ").is_err());
        assert!(Project::from_ron("not ron at all {{{").is_err());
        let mut project = sample();
        project.active_model = Some(3);
        let message = format!("{:#}", Project::from_ron(&project.to_ron().unwrap()).unwrap_err());
        assert!(message.contains("active model 3"), "{message}");
        project.active_model = None;
        let mut bad_tiles = project.clone();
        bad_tiles.training.geometry.layout = crate::geometry::Layout::Tiles { tile: 8, overlap: 0 };
        let message = format!("{:#}", Project::from_ron(&bad_tiles.to_ron().unwrap()).unwrap_err());
        assert!(message.contains("training geometry") && message.contains("tile side 8"), "{message}");
        project.format_version = 99;
        let message = format!("{:#}", Project::from_ron(&project.to_ron().unwrap()).unwrap_err());
        assert!(message.contains("newer Loupe"), "{message}");
    }

    #[test]
    fn relinking_a_renamed_folder_moves_its_labels_and_pins() {
        let mut project = sample();
        project.relink_source(0, "/mnt/moved/tiles-2024".into()).unwrap();
        assert_eq!(project.sources[0], Source::Benchmark("/mnt/moved/tiles-2024".into()));
        let keys: Vec<&String> = project.labels.keys().collect();
        assert_eq!(keys, ["tiles-2024/test/crack/000.png"]);
        assert_eq!(project.pinned, ["tiles-2024/test/crack/000.png"], "pins move with their folder");
        assert!(project.relink_source(7, "/x".into()).is_err());
        // A Folder layout moves with its parent folder.
        project.sources[1] = Source::Folder {
            normal: "/abs/tiles-b/good".into(),
            abnormal: "/abs/tiles-b/bad".into(),
            mask: Some("/abs/tiles-b/masks".into()),
        };
        project.labels.insert("tiles-b/bad/3.png".into(), Default::default());
        project.relink_source(1, "/new/tiles-c".into()).unwrap();
        let expected = Source::Folder {
            normal: "/new/tiles-c/good".into(),
            abnormal: "/new/tiles-c/bad".into(),
            mask: Some("/new/tiles-c/masks".into()),
        };
        assert_eq!(project.sources[1], expected);
        assert!(project.labels.contains_key("tiles-c/bad/3.png"));
        // Folders without a common parent cannot move as one.
        project.sources[1] = Source::Folder { normal: "/a/good".into(), abnormal: "/b/bad".into(), mask: None };
        assert!(project.relink_source(1, "/x".into()).is_err());
        assert_eq!(
            project.sources[1],
            Source::Folder { normal: "/a/good".into(), abnormal: "/b/bad".into(), mask: None }
        );
    }

    #[test]
    fn sources_with_the_same_folder_name_never_share_labels() {
        let mut project = Project::new("lines");
        project.sources.push(Source::NormalFolder("/data/lineA/images".into()));
        project.sources.push(Source::NormalFolder("/data/lineB/images".into()));
        project.sources.push(Source::Inspect("/".into()));
        project.sources.push(Source::Inspect("x/..".into()));
        assert_eq!(project.source_names(), ["images", "images (2)", "source", "source (2)"]);
        // Relinking the first to a new name frees "images" for the second: both sources' labels follow.
        project.labels.insert("images/1.png".into(), Default::default());
        let second = ImageLabel { verdict: Some(Verdict::Defect), ..Default::default() };
        project.labels.insert("images (2)/1.png".into(), second.clone());
        project.relink_source(0, "/data/lineA/camera".into()).unwrap();
        assert_eq!(project.source_names()[..2], ["camera", "images"]);
        assert_eq!(project.labels.get("images/1.png"), Some(&second));
        assert_eq!(project.labels.get("camera/1.png"), Some(&ImageLabel::default()));
        assert_eq!(project.labels.len(), 2);
    }

    #[test]
    fn paths_inside_the_project_are_stored_relative() {
        let dir = Path::new("/work/projects/a");
        assert_eq!(relative_to(dir, Path::new("/work/projects/a/data/x")), PathBuf::from("data/x"));
        assert_eq!(relative_to(dir, Path::new("/elsewhere/x")), PathBuf::from("/elsewhere/x"));
        assert_eq!(resolve(dir, Path::new("data/x")), PathBuf::from("/work/projects/a/data/x"));
        assert_eq!(resolve(dir, Path::new("/elsewhere/x")), PathBuf::from("/elsewhere/x"));
    }
}
