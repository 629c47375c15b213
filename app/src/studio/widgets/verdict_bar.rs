//! The labeller's verdict for one image: three toggle buttons and one key each (G good, D defect, U unsure;
//! X clears), so a person can label a gallery without the mouse. Changes go into the project's labels and
//! mark the studio changed (the autosave writes them within a second).

use crate::studio::Studio;
use eframe::egui;
use loupe_engine::labels::Verdict;

const KEYS: [(egui::Key, Option<Verdict>); 4] = [
    (egui::Key::G, Some(Verdict::Good)),
    (egui::Key::D, Some(Verdict::Defect)),
    (egui::Key::U, Some(Verdict::Unsure)),
    (egui::Key::X, None),
];

fn key_name(verdict: Option<Verdict>) -> &'static str {
    match verdict {
        Some(Verdict::Good) => "G",
        Some(Verdict::Defect) => "D",
        Some(Verdict::Unsure) => "U",
        None => "X",
    }
}

/// Draws the bar for image `index` and applies a click or a key press; true when the verdict was set by a key
/// (the inspector then moves on to the next image).
pub fn show(ui: &mut egui::Ui, studio: &mut Studio, index: usize) -> bool {
    let key = studio.images[index].label_key.clone();
    let current = studio.project.labels.get(&key).and_then(|label| label.verdict);
    let pressed = ui.input(|i| KEYS.iter().find(|(k, _)| i.key_pressed(*k)).map(|(_, verdict)| *verdict));
    let mut chosen = pressed;
    ui.horizontal(|ui| {
        ui.label("Label");
        for verdict in Verdict::ALL {
            let text = format!("{} ({})", verdict.name(), key_name(Some(verdict)));
            if ui.selectable_label(current == Some(verdict), text).clicked() {
                chosen = Some(if current == Some(verdict) { None } else { Some(verdict) });
            }
        }
        ui.label(egui::RichText::new("X clears · the next image follows a key").weak());
    });
    match chosen {
        Some(verdict) if verdict != current => {
            set_verdict(studio, &key, verdict);
            pressed.is_some()
        }
        _ => false,
    }
}

fn set_verdict(studio: &mut Studio, key: &str, verdict: Option<Verdict>) {
    let label = studio.project.labels.entry(key.to_string()).or_default();
    label.verdict = verdict;
    if label.is_empty() {
        studio.project.labels.remove(key);
    }
    studio.changed();
}
