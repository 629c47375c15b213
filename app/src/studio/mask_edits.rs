//! The labeller's defect masks while they are painted: the mask of the image on screen (read from its PNG on
//! rayon's pool, never on the UI thread), its undo history, and every mask changed since the last save. The
//! saver writes those PNGs (atomically) before the project file that refers to them, so a project on disk never
//! names a mask that is not there. Each change names a new file (`masks/<key>.<session>-<revision>.png`, the
//! session being when this studio started: revisions count from 0 in every session): the mask a
//! saved project names is never overwritten, so if writing the project fails after its masks were written, the
//! project on disk still agrees with its masks. The files a change left behind are deleted by the saver once a
//! project that no longer names them is on disk.

use crate::project::mask_files::{is_own_mask_file, mask_file, session_stamp};
use loupe_engine::labels::mask::{DefectMask, Dirty, MaskHistory};
use loupe_engine::labels::{ImageLabel, Verdict};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

/// Masks kept in memory (with their undo history) besides the unsaved ones; older saved ones are dropped.
const KEPT_MASKS: usize = 8;

pub struct EditedMask {
    pub mask: DefectMask,
    pub history: MaskHistory,
    /// The part changed since the screen's texture was last updated (`None`: nothing).
    pub dirty: Option<Dirty>,
    /// Bumped on every change, so a texture built from another version is rebuilt.
    pub version: u64,
    /// Defect pixels, counted when the mask arrives and after each change (not every frame: a mask can be
    /// 4096² or more).
    pub marked: usize,
    /// Read from a file (so there is something to draw even before the first change).
    pub from_file: bool,
    /// Where the current content goes (relative to the project folder); `None` while it has no defect pixels.
    file: Option<PathBuf>,
    /// Studio revision of the last change, and of the last change written to disk.
    changed: u64,
    written: u64,
    last_used: u64,
}

impl EditedMask {
    fn new(mask: DefectMask, from_file: bool) -> Self {
        let marked = mask.defect_pixels();
        Self {
            mask,
            history: MaskHistory::default(),
            dirty: None,
            version: 0,
            marked,
            from_file,
            file: None,
            changed: 0,
            written: 0,
            last_used: 0,
        }
    }

    /// Whether there is anything to draw: a mask that was read or painted (an untouched new mask is empty).
    pub fn has_content(&self) -> bool {
        self.from_file || self.version > 0
    }
}

pub enum MaskState<'a> {
    Loading,
    Failed(&'a str),
    Ready(&'a mut EditedMask),
}

type Loaded = (String, Result<DefectMask, String>);

pub struct MaskEdits {
    masks: HashMap<String, EditedMask>,
    failed: HashMap<String, String>,
    loading: Vec<String>,
    sender: mpsc::Sender<Loaded>,
    receiver: mpsc::Receiver<Loaded>,
    uses: u64,
    /// Mask files that labels named before a change, to delete once a project without them is saved.
    superseded: Vec<PathBuf>,
    /// This session's stamp in mask file names (milliseconds since 1970, hexadecimal).
    session: String,
}

impl Default for MaskEdits {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel();
        Self {
            masks: HashMap::new(),
            failed: HashMap::new(),
            loading: Vec::new(),
            sender,
            receiver,
            uses: 0,
            superseded: Vec::new(),
            session: session_stamp(),
        }
    }
}

impl MaskEdits {
    /// The mask of the image labelled `key`: the one in memory, else read from `file` (started on first request;
    /// `repaint` wakes the UI when done), else an empty mask of `size` (the image's full resolution).
    pub fn get(
        &mut self,
        key: &str,
        file: Option<PathBuf>,
        size: [u32; 2],
        repaint: impl Fn() + Send + 'static,
    ) -> MaskState<'_> {
        while let Ok((loaded_key, result)) = self.receiver.try_recv() {
            self.loading.retain(|k| *k != loaded_key);
            match result {
                Ok(mask) => {
                    self.masks.entry(loaded_key).or_insert_with(|| EditedMask::new(mask, true));
                }
                Err(reason) => {
                    self.failed.insert(loaded_key, reason);
                }
            }
        }
        if let Some(reason) = self.failed.get(key) {
            return MaskState::Failed(reason);
        }
        if !self.masks.contains_key(key) {
            match file {
                Some(path) => {
                    if !self.loading.iter().any(|k| k == key) {
                        self.loading.push(key.to_string());
                        let (sender, key) = (self.sender.clone(), key.to_string());
                        rayon::spawn(move || {
                            let _ = sender.send((key, DefectMask::read(&path).map_err(|e| format!("{e:#}"))));
                            repaint();
                        });
                    }
                    return MaskState::Loading;
                }
                None => {
                    self.masks.insert(key.to_string(), EditedMask::new(DefectMask::new(size[0], size[1]), false));
                }
            }
        }
        self.uses += 1;
        let uses = self.uses;
        let edited = self.masks.get_mut(key).expect("inserted above");
        edited.last_used = uses;
        MaskState::Ready(edited)
    }

    /// Replaces a mask that could not be read with an empty one (the broken file is overwritten on the next save).
    pub fn start_empty(&mut self, key: &str, size: [u32; 2]) {
        self.failed.remove(key);
        self.masks.insert(key.to_string(), EditedMask::new(DefectMask::new(size[0], size[1]), false));
    }

    /// Records that the mask of `key` changed (in the studio revision `revision`) and updates its label: a
    /// painted mask makes the image a defect and is referenced from the label, under a file name of this
    /// revision; an emptied one is not referenced. The file the label named before is superseded.
    pub fn changed(&mut self, key: &str, revision: u64, label: &mut ImageLabel) {
        let Some(edited) = self.masks.get_mut(key) else { return };
        edited.changed = revision;
        edited.version += 1;
        edited.marked = edited.mask.defect_pixels();
        let file = (edited.marked > 0).then(|| mask_file(key, &format!("{}-{revision}", self.session)));
        edited.file = file.clone();
        if let Some(previous) = std::mem::replace(&mut label.mask, file) {
            if is_own_mask_file(&previous) {
                self.superseded.push(previous);
            }
        }
        if edited.marked > 0 {
            label.verdict = Some(Verdict::Defect);
        }
        self.forget_old();
    }

    /// The masks changed since they were last written that have content, with the file (under `project_dir`)
    /// each goes to.
    pub fn unsaved(&self, project_dir: &Path) -> Vec<(PathBuf, Arc<DefectMask>)> {
        self.masks
            .values()
            .filter(|edited| edited.changed > edited.written)
            .filter_map(|edited| Some((project_dir.join(edited.file.as_ref()?), Arc::new(edited.mask.clone()))))
            .collect()
    }

    /// The superseded mask files (relative to the project folder) since the last call: the project saved next no
    /// longer names them.
    pub fn take_superseded(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.superseded)
    }

    /// The project revision `revision` is on disk: every mask change up to it is too.
    pub fn saved(&mut self, revision: u64) {
        for edited in self.masks.values_mut() {
            if edited.changed <= revision {
                edited.written = edited.changed;
            }
        }
        self.forget_old();
    }

    pub fn has_unsaved(&self) -> bool {
        self.masks.values().any(|edited| edited.changed > edited.written)
    }

    /// Drops the mask of `key` from memory (its file was replaced), unless it has unsaved strokes.
    pub fn forget(&mut self, key: &str) {
        if self.masks.get(key).is_some_and(|edited| edited.changed <= edited.written) {
            self.masks.remove(key);
        }
        self.failed.remove(key);
    }

    fn forget_old(&mut self) {
        if self.masks.len() <= KEPT_MASKS {
            return;
        }
        let mut saved: Vec<(u64, String)> = self
            .masks
            .iter()
            .filter(|(_, edited)| edited.changed <= edited.written)
            .map(|(key, edited)| (edited.last_used, key.clone()))
            .collect();
        saved.sort();
        let excess = self.masks.len() - KEPT_MASKS;
        for (_, key) in saved.into_iter().take(excess) {
            self.masks.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_names_a_new_file_and_supersedes_the_last() {
        let mut edits = MaskEdits::default();
        let mut label = ImageLabel::default();
        let MaskState::Ready(edited) = edits.get("k/1.png", None, [8, 8], || {}) else { panic!() };
        edited.mask.stroke([2.0, 2.0], [2.0, 2.0], 1.0, true);
        edits.changed("k/1.png", 1, &mut label);
        let first = label.mask.clone().unwrap();
        assert_eq!(
            edits.unsaved(Path::new("/p")),
            vec![(Path::new("/p").join(&first), Arc::new(edits.masks["k/1.png"].mask.clone()))]
        );
        assert!(edits.take_superseded().is_empty());
        edits.changed("k/1.png", 2, &mut label);
        let second = label.mask.clone().unwrap();
        assert_ne!(first, second);
        assert_eq!(edits.take_superseded(), vec![first]);
        // A project naming a file outside masks/ never gets it deleted.
        label.mask = Some("/etc/passwd".into());
        edits.changed("k/1.png", 3, &mut label);
        assert!(edits.take_superseded().is_empty());
    }
}
