//! What each method setting means, for people: a label, a unit, one sentence of help, whether it is an
//! advanced setting, and the paper's value where Loupe's default differs from it. The studio's Train view and
//! `loupe methods --settings NAME` both read it from here; a test holds every setting of every method to have
//! one, so a new setting cannot appear without words.
//!
//! Settings shared by several methods with one meaning are in [`COMMON`]; a method's own (or one whose
//! meaning differs per method, such as `width`) are in its `method_info!`'s `docs`, which win.

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

pub const fn common(label: &'static str, unit: &'static str, help: &'static str, advanced: bool) -> SettingDoc {
    SettingDoc { label, unit, help, advanced, paper: None }
}

pub const fn paper(doc: SettingDoc, value: &'static str) -> SettingDoc {
    SettingDoc { paper: Some(value), ..doc }
}

pub const TRAINING_EPOCHS: SettingDoc =
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
    (
        "image_score_top",
        common(
            "Image score: top share",
            "",
            "The image score is the mean of this share of the map's highest values (0: the map's maximum). A \
             larger share favours defects of some extent over single hot pixels.",
            false,
        ),
    ),
    ("epochs", TRAINING_EPOCHS),
    (
        "adam_beta1",
        common(
            "Optimiser momentum (β₁)",
            "",
            "How much of the previous steps' gradient direction AdamW keeps (0.9 usually; lower follows each \
             batch more closely).",
            true,
        ),
    ),
    (
        "final_learning_rate_share",
        common(
            "Final learning rate",
            "",
            "The learning rate falls along a half cosine to this share of itself by the last step (1: constant; \
             a small share lets the last epochs settle).",
            true,
        ),
    ),
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

/// What `key` means for `method`: the method's own words (its `method_info!` `docs`), else the shared ones.
pub fn doc(method: &str, key: &str) -> Option<SettingDoc> {
    let own = crate::methods::find_method(method).ok().and_then(|info| info.docs.iter().find(|(k, _)| *k == key));
    own.or_else(|| COMMON.iter().find(|(k, _)| *k == key)).map(|(_, doc)| *doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::REGISTRY;

    #[test]
    fn every_setting_of_every_method_has_words() {
        for method in REGISTRY.iter() {
            let defaults = (method.default_settings)();
            for key in defaults.as_object().expect("settings are an object").keys() {
                let doc =
                    doc(method.name, key).unwrap_or_else(|| panic!("{}: setting `{key}` has no doc", method.name));
                assert!(!doc.label.is_empty() && doc.help.ends_with('.'), "{}: `{key}`", method.name);
            }
        }
        // And nothing documented that the method does not have (a renamed setting leaves its words behind).
        for method in REGISTRY.iter() {
            for (key, _) in method.docs {
                assert!((method.default_settings)().get(key).is_some(), "{} has no setting `{key}`", method.name);
            }
        }
    }
}
