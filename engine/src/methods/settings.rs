//! The allowed range of every numeric method setting, and the one check every path goes through: the CLI's
//! `--set` and `--preset`, the studio's editors, and the settings read back from a model file. A model file is
//! untrusted input: a setting that sizes something (a blur kernel, a network's width, a batch) must not be able
//! to ask for more memory or time than its range allows, whoever wrote the file.
//!
//! Settings shared by several methods (`epochs`, `learning_rate`, `blur_sigma`, …) have one range here,
//! [`COMMON_RANGES`]; a method declares the ranges of its own settings in its `method_info!`. Every numeric
//! setting must have a range (tested over the registry), so a new setting cannot slip through unbounded.
//! Ranges bound values; what depends on several values or on the image size (DRAEM's `downsample` dividing the
//! size, CFlow's `condition_dim` being a multiple of 4) stays in the method's own `check_settings`.

use anyhow::{bail, Result};

/// The closed range `min..=max` of one numeric setting; for a list setting, of each element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SettingRange {
    pub name: &'static str,
    pub min: f64,
    pub max: f64,
}

impl SettingRange {
    pub const fn new(name: &'static str, min: f64, max: f64) -> Self {
        Self { name, min, max }
    }

    /// `"1..=10000"`, as the CLI and the error messages print it.
    pub fn describe(&self) -> String {
        format!("{}..={}", self.min, self.max)
    }

    fn check(&self, value: &serde_json::Value) -> Result<()> {
        let number = value.as_f64().filter(|v| v.is_finite());
        match number {
            Some(v) if (self.min..=self.max).contains(&v) => Ok(()),
            _ => bail!("setting `{}` = {value} is outside its range {}", self.name, self.describe()),
        }
    }
}

/// Ranges of the settings several methods share. Sized for a GPU's published schedules at the top (hours, not
/// days) and for what a CPU default needs at the bottom.
pub const COMMON_RANGES: &[SettingRange] = &[
    SettingRange::new("epochs", 1.0, 10_000.0),
    SettingRange::new("steps_per_epoch", 1.0, 100_000.0),
    SettingRange::new("batch_size", 1.0, 256.0),
    SettingRange::new("images_per_step", 1.0, 256.0),
    SettingRange::new("learning_rate", 1e-9, 10.0),
    SettingRange::new("weight_decay", 0.0, 1.0),
    // A week; 0 means no budget.
    SettingRange::new("time_budget_seconds", 0.0, 604_800.0),
    SettingRange::new("seed", 0.0, u64::MAX as f64),
    // β₁ = 1 would never move the running mean off zero.
    SettingRange::new("adam_beta1", 0.0, 0.999),
    // A share of the learning rate: 0 decays to nothing, 1 keeps it constant.
    SettingRange::new("final_learning_rate_share", 0.0, 1.0),
    // A kernel of 2·⌊4σ + 0.5⌋ + 1 = 257 taps at most; σ 4 is the default.
    SettingRange::new("blur_sigma", 0.0, 32.0),
    // A share of the map's pixels; 0 is the maximum.
    SettingRange::new("image_score_top", 0.0, 1.0),
];

/// Refuses a key of `given` that the parsed settings do not have: a typo, or a setting of another method or
/// version, must not pass silently (serde's `deny_unknown_fields` cannot see through the flattened
/// [`Schedule`](crate::methods::training::Schedule), so every method is checked here instead).
pub fn check_known_keys(method: &str, parsed: &impl serde::Serialize, given: &serde_json::Value) -> Result<()> {
    let known = serde_json::to_value(parsed)?;
    let (Some(known), Some(given)) = (known.as_object(), given.as_object()) else { return Ok(()) };
    if let Some(unknown) = given.keys().find(|key| !known.contains_key(*key)) {
        let names: Vec<&String> = known.keys().collect();
        bail!("{method}: unknown setting `{unknown}` (known: {names:?})");
    }
    Ok(())
}

/// The range of setting `name`: the method's own, else the shared one.
pub fn range_of(own: &[SettingRange], name: &str) -> Option<SettingRange> {
    own.iter().chain(COMMON_RANGES).find(|r| r.name == name).copied()
}

/// Checks every numeric value (and every number in a list) of a settings object against its range. A number
/// without a declared range is refused too: it is a setting this check does not know how to bound.
pub fn check_ranges(method: &str, own: &[SettingRange], settings: &serde_json::Value) -> Result<()> {
    let Some(object) = settings.as_object() else { bail!("{method} settings must be a JSON object, got {settings}") };
    for (name, value) in object {
        let numbers: Vec<&serde_json::Value> = match value {
            serde_json::Value::Number(_) => vec![value],
            serde_json::Value::Array(items) => items.iter().filter(|v| !v.is_string()).collect(),
            _ => continue,
        };
        if numbers.is_empty() {
            continue;
        }
        let Some(range) = range_of(own, name) else {
            bail!("{method}: setting `{name}` has no declared range, so it is refused")
        };
        for number in numbers {
            range.check(number).map_err(|e| anyhow::anyhow!("{method}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OWN: &[SettingRange] = &[SettingRange::new("levels", 0.0, 1.0), SettingRange::new("epochs", 1.0, 5.0)];

    #[test]
    fn values_inside_their_ranges_pass() {
        let settings = json!({"epochs": 5, "blur_sigma": 4.0, "levels": [0, 1], "calibrate": true, "mode": "max"});
        check_ranges("m", OWN, &settings).unwrap();
    }

    #[test]
    fn a_value_outside_names_the_setting_the_value_and_the_range() {
        let message = check_ranges("m", OWN, &json!({"blur_sigma": 1e9})).unwrap_err().to_string();
        assert!(message.contains("`blur_sigma` = 1000000000") && message.contains("0..=32"), "{message}");
        // The method's own range wins over the shared one.
        let message = check_ranges("m", OWN, &json!({"epochs": 6})).unwrap_err().to_string();
        assert!(message.contains("1..=5"), "{message}");
        assert!(check_ranges("m", OWN, &json!({"levels": [0, 7]})).is_err());
        assert!(check_ranges("m", OWN, &json!({"learning_rate": -1.0})).is_err());
        assert!(check_ranges("m", OWN, &json!({"seed": -1})).is_err());
    }

    #[test]
    fn every_method_bounds_every_numeric_setting_and_its_defaults_and_presets_pass() {
        for method in crate::methods::REGISTRY.iter() {
            method.settings_with(&json!({})).unwrap_or_else(|e| panic!("{} defaults: {e:#}", method.name));
            for preset in method.presets {
                (method.check)(&(preset.settings)())
                    .unwrap_or_else(|e| panic!("{} {}: {e:#}", method.name, preset.name));
            }
            let defaults = (method.default_settings)();
            // A setting every method bounds: its map blur, else its first own ranged setting.
            let key = ["blur_sigma", "gauss_std"]
                .into_iter()
                .find(|k| defaults.get(k).is_some())
                .or_else(|| method.ranges.first().map(|range| range.name))
                .unwrap_or_else(|| panic!("{} has no bounded setting", method.name));
            let value = if defaults[key].is_array() { json!([1e9]) } else { json!(1e9) };
            let message = method.settings_with(&json!({key: value})).unwrap_err().to_string();
            assert!(message.contains("outside its range"), "{}: {message}", method.name);
        }
    }

    #[test]
    fn numbers_without_a_range_and_non_objects_are_refused() {
        let message = check_ranges("m", OWN, &json!({"width": 4})).unwrap_err().to_string();
        assert!(message.contains("no declared range"), "{message}");
        assert!(check_ranges("m", OWN, &json!([1, 2])).is_err());
    }
}
