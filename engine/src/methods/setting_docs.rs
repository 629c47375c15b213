//! What each method setting means, for people: a label, a unit, one sentence of help, whether it is an
//! advanced setting, and the paper's value where Loupe's default differs from it. The studio's Train view and
//! `loupe methods --settings NAME` both read it from here; a test holds every setting of every method to have
//! one, so a new setting cannot appear without words.
//!
//! Settings shared by several methods with one meaning are in [`COMMON`]; a method's own (or one whose
//! meaning differs per method, such as `width`) are in [`BY_METHOD`], which wins.

/// What a setting means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SettingDoc {
    pub label: &'static str,
    /// Unit of the value ("" when it has none).
    pub unit: &'static str,
    pub help: &'static str,
    /// Worth changing only with a reason (hidden behind "advanced" in the studio).
    pub advanced: bool,
    /// The paper's value, where Loupe's default differs (the defaults are sized for a 2-core CPU).
    pub paper: Option<&'static str>,
}

const fn common(label: &'static str, unit: &'static str, help: &'static str, advanced: bool) -> SettingDoc {
    SettingDoc { label, unit, help, advanced, paper: None }
}

const fn paper(doc: SettingDoc, value: &'static str) -> SettingDoc {
    SettingDoc { paper: Some(value), ..doc }
}

const TRAINING_EPOCHS: SettingDoc =
    common("Epochs", "", "Passes over the training schedule; more trains longer and usually fits better.", false);

/// Settings with the same meaning in every method that has them.
pub const COMMON: &[(&str, SettingDoc)] = &[
    (
        "seed",
        common(
            "Random seed",
            "",
            "Makes sampling and initialisation repeatable; change it to see how much a result varies.",
            true,
        ),
    ),
    (
        "blur_sigma",
        common(
            "Map smoothing",
            "px",
            "σ of the Gaussian blur applied to the anomaly map, in input pixels (0: none).",
            false,
        ),
    ),
    ("epochs", TRAINING_EPOCHS),
    ("steps_per_epoch", common("Steps per epoch", "", "Optimisation steps counted as one epoch.", true)),
    (
        "learning_rate",
        common(
            "Learning rate",
            "",
            "Step size of the optimiser (Adam); too high diverges, too low learns slowly.",
            true,
        ),
    ),
    (
        "weight_decay",
        common("Weight decay", "", "Pull of the weights towards zero at each step (regularisation).", true),
    ),
    (
        "time_budget_seconds",
        common(
            "Time budget",
            "s",
            "Stop starting new epochs after this many seconds and keep the best model so far (0: train every epoch).",
            false,
        ),
    ),
    ("batch_size", common("Batch size", "images", "Training images per optimisation step.", true)),
    ("images_per_step", common("Images per step", "images", "Normal training images per optimisation step.", true)),
    (
        "local_average",
        common(
            "Local averaging",
            "",
            "Model 3×3-averaged features (as PatchCore does) instead of the raw feature maps.",
            true,
        ),
    ),
    (
        "levels",
        common(
            "Backbone levels",
            "",
            "Feature levels modelled: 0 = stride 8 (40 channels), 1 = stride 16 (112 channels).",
            false,
        ),
    ),
    (
        "clamp_alpha",
        common(
            "Scale clamp α",
            "",
            "α in exp(α·tanh(·)): bounds how much each flow block may scale (stability).",
            true,
        ),
    ),
];

/// Settings of one method (or whose meaning depends on the method).
pub const BY_METHOD: &[(&str, &str, SettingDoc)] = &[
    // PatchCore
    ("patchcore", "coreset_ratio", common("Memory bank share", "", "Fraction of all training patches kept in the memory bank (greedy coreset): more is more accurate and slower.", false)),
    ("patchcore", "max_bank", common("Memory bank limit", "rows", "Most patches the memory bank keeps, whatever the share (0: the share alone): bounds scoring time and memory on large training sets.", true)),
    ("patchcore", "selection_chunk", common("Selection chunk", "rows", "Patch features gathered before a large training set's selection cuts them to candidates: bounds the fit's memory (rows × 608 bytes).", true)),
    ("patchcore", "num_neighbors", common("Re-weighting neighbours", "", "Bank neighbours used to re-weight the image score (1: the plain maximum patch distance).", true)),
    ("patchcore", "projection_dim", common("Coreset projection", "dims", "Dimensions of the random projection used while choosing the coreset (0: none); only speeds the choice.", true)),
    ("patchcore", "coreset_method", common("Coreset algorithm", "", "auto, exact (plain greedy) or cells (greedy per spatial cell, for large banks).", true)),
    ("patchcore", "search", common("Nearest-entry search", "", "auto, exhaustive or inverted (an index on the CPU: much faster, same image scores, the map can differ slightly).", true)),
    ("patchcore", "search_probes", common("Index probes", "lists", "Lists of the inverted index each patch searches: more gives a map closer to the exhaustive one, slower.", true)),
    ("patchcore", "search_lists", common("Index lists", "lists", "Lists the index splits the bank into (0: about 4·√bank).", true)),
    // PaDiM
    ("padim", "feature_count", common("Feature channels", "", "Channels kept of the 152 (a seeded random subset, as in the paper).", false)),
    ("padim", "regularization", common("Covariance ε", "", "Added to each position's covariance diagonal so it can be inverted.", true)),
    // CFlow
    ("cflow", "coupling_blocks", common("Coupling blocks", "", "Affine coupling blocks of each flow: more is more expressive and slower.", false)),
    ("cflow", "condition_dim", common("Position code length", "", "Length of the positional code each vector is conditioned on (a multiple of 4).", true)),
    ("cflow", "vectors_per_step", common("Vectors per step", "", "Feature vectors per level per optimisation step.", true)),
    // FastFlow
    ("fastflow", "flow_steps", common("Flow steps", "", "Coupling steps of the 2-D flow: more is more expressive and slower.", false)),
    ("fastflow", "hidden_ratio", common("Hidden width ratio", "", "Width of each coupling's sub-network relative to its input channels.", true)),
    ("fastflow", "conv3x3_only", common("All 3×3 blocks", "", "Every block 3×3 (the paper's 3-3 variant) instead of alternating 3×3 and 1×1.", true)),
    // Autoencoder
    ("autoencoder", "downsample", common("Input reduction", "×", "The network sees the image average-pooled by this factor (1, 2 or 4): smaller trains faster, sees less detail.", false)),
    ("autoencoder", "width", common("Network width", "channels", "Channels of the first encoder stage; later stages double it (at most 4×).", false)),
    ("autoencoder", "latent_dim", common("Bottleneck size", "channels", "Channels of the bottleneck: too wide reconstructs defects too.", false)),
    // STFPM
    ("stfpm", "width", common("Student width", "channels", "Channels of the student's first stage; later stages double it (at most 4×).", false)),
    // DRAEM
    ("draem", "downsample", common("Input reduction", "×", "The reconstructive network sees the image average-pooled by this factor (1, 2 or 4).", false)),
    ("draem", "reconstructive_width", common("Reconstructive width", "channels", "Channels of the reconstructive network's first stage; later stages double it.", true)),
    ("draem", "discriminative_width", common("Discriminative width", "channels", "Channels of the discriminative U-Net's first stage; later stages double it.", true)),
    ("draem", "brightness_anomalies", common("Brightness anomalies", "", "Half of the synthetic defects change the part's own brightness instead of pasting a foreign texture.", true)),
    ("draem", "contour_masks", common("Crack-like masks", "", "Half of the synthetic defect shapes are thin bands (crack-like) instead of blobs.", true)),
    ("draem", "calibrate", common("Per-position calibration", "", "Standardise the map per position against 200 training images (needs that many).", true)),
    ("draem", "deviation_prior", common("Deviation prior", "", "The discriminator starts from the patch's feature deviation and learns the correction.", true)),
    ("draem", "epochs", paper(TRAINING_EPOCHS, "700")),
    // CutPaste
    ("cutpaste", "embedding_dim", common("Embedding size", "", "Dimensions of the learnt image embedding the Gaussian density is fitted on.", true)),
    ("cutpaste", "shrinkage", common("Covariance shrinkage", "", "λ in (1 − λ)·Σ + λ·(tr Σ / d)·I: steadies the Gaussian on few images.", true)),
    // FCDD
    ("fcdd", "width", common("Head width", "channels", "Channels of the trained convolutions on top of the backbone.", true)),
    ("fcdd", "gauss_std", common("Receptive-field σ", "px", "σ of the Gaussian that spreads each cell's score over the input pixels.", true)),
    ("fcdd", "image_score", common("Image score", "", "How the image score is read off the cells.", true)),
    // Mean-shifted contrastive
    ("mean-shifted", "positions_per_step", common("Positions per step", "", "Patch positions contrasted per step (each with its two views).", true)),
    ("mean-shifted", "hidden", common("Adapter width", "channels", "Hidden width of the adapter trained on the features.", true)),
    ("mean-shifted", "temperature", common("Temperature τ", "", "Temperature of the contrastive loss: lower separates views more sharply.", true)),
];

/// What `key` means for `method`, if it is documented.
pub fn doc(method: &str, key: &str) -> Option<SettingDoc> {
    BY_METHOD
        .iter()
        .find(|(m, k, _)| *m == method && *k == key)
        .map(|(_, _, doc)| *doc)
        .or_else(|| COMMON.iter().find(|(k, _)| *k == key).map(|(_, doc)| *doc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::REGISTRY;

    #[test]
    fn every_setting_of_every_method_has_words() {
        for method in REGISTRY {
            let defaults = (method.default_settings)();
            for key in defaults.as_object().expect("settings are an object").keys() {
                let doc =
                    doc(method.name, key).unwrap_or_else(|| panic!("{}: setting `{key}` has no doc", method.name));
                assert!(!doc.label.is_empty() && doc.help.ends_with('.'), "{}: `{key}`", method.name);
            }
        }
        // And nothing documented that no method has (a renamed setting leaves its words behind).
        for (method, key, _) in BY_METHOD {
            let info = REGISTRY.iter().find(|m| m.name == *method).unwrap_or_else(|| panic!("no method {method}"));
            assert!((info.default_settings)().get(key).is_some(), "{method} has no setting `{key}`");
        }
    }
}
