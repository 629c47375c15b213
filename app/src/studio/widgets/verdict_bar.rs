//! The labeller's verdict for one image: three toggle buttons and one key each (G good, D defect, U unsure;
//! X clears), so a person can label a gallery without the mouse; and its defect types, toggled from the
//! project's list, which a text field extends. Changes go into the project's labels and mark the studio
//! changed (the autosave writes them within a second). In review, the model's verdict on the image can be
//! accepted (A) or rejected (R): the label becomes the model's verdict or its opposite, and the answer is kept.

use crate::project::verdict::{verdict, Verdict as ModelVerdict};
use crate::studio::Studio;
use eframe::egui;
use loupe_engine::labels::{ReviewAnswer, Verdict};

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
    // Keys label only when no text field has the keyboard (typing a new defect type must not label).
    let typing = ui.ctx().egui_wants_keyboard_input();
    let pressed =
        ui.input(|i| KEYS.iter().find(|(k, _)| i.key_pressed(*k)).map(|(_, verdict)| *verdict)).filter(|_| !typing);
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
    defect_types(ui, studio, &key);
    let reviewed = review(ui, studio, index, typing);
    match chosen {
        Some(verdict) if verdict != current => {
            set_verdict(studio, &key, verdict);
            pressed.is_some()
        }
        _ => reviewed,
    }
}

/// The model's verdict on image `index` with accept / reject (buttons, A / R keys); true when answered by key.
fn review(ui: &mut egui::Ui, studio: &mut Studio, index: usize, typing: bool) -> bool {
    let image = &studio.images[index];
    let (Some(score), Some((decision, band))) = (studio.score_of(image), studio.thresholds()) else { return false };
    let key = image.label_key.clone();
    let says_defect = match verdict(score, decision, band) {
        ModelVerdict::Reject => Some(true),
        ModelVerdict::Pass => Some(false),
        ModelVerdict::Review => None,
    };
    let answered = studio.project.labels.get(&key).and_then(|label| label.review);
    let mut answer = ui
        .input(|i| {
            if i.key_pressed(egui::Key::A) {
                Some(ReviewAnswer::Accepted)
            } else if i.key_pressed(egui::Key::R) {
                Some(ReviewAnswer::Rejected)
            } else {
                None
            }
        })
        .filter(|_| !typing && says_defect.is_some());
    let by_key = answer.is_some();
    ui.horizontal(|ui| {
        let said = match says_defect {
            Some(true) => "the model rejects this part (defect)",
            Some(false) => "the model passes this part (good)",
            None => "the model sends this part to review: give a verdict above",
        };
        ui.label(format!("Review: {said}"));
        ui.add_enabled_ui(says_defect.is_some(), |ui| {
            for (choice, text) in [(ReviewAnswer::Accepted, "accept (A)"), (ReviewAnswer::Rejected, "reject (R)")] {
                if ui.selectable_label(answered == Some(choice), text).clicked() {
                    answer = Some(choice);
                }
            }
        });
    });
    let (Some(answer), Some(says_defect)) = (answer, says_defect) else { return false };
    let label = studio.project.labels.entry(key).or_default();
    label.review = Some(answer);
    label.verdict =
        Some(if says_defect == (answer == ReviewAnswer::Accepted) { Verdict::Defect } else { Verdict::Good });
    studio.changed();
    by_key
}

fn set_verdict(studio: &mut Studio, key: &str, verdict: Option<Verdict>) {
    let label = studio.project.labels.entry(key.to_string()).or_default();
    label.verdict = verdict;
    // An answer in review described the verdict it set; a verdict given by hand replaces it.
    label.review = None;
    if label.is_empty() {
        studio.project.labels.remove(key);
    }
    studio.changed();
}

/// Toggle buttons for the project's defect types on this image, and a field that adds a new type.
fn defect_types(ui: &mut egui::Ui, studio: &mut Studio, key: &str) {
    let id = egui::Id::unique("loupe: new defect type");
    let mut new_type: String = ui.data_mut(|d| d.get_temp(id).unwrap_or_default());
    let mut toggled = None;
    let mut added = None;
    ui.horizontal_wrapped(|ui| {
        ui.label("Defect types");
        let current = studio.project.labels.get(key).map(|l| l.defect_types.clone()).unwrap_or_default();
        for kind in &studio.project.defect_types {
            if ui.selectable_label(current.contains(kind), kind).clicked() {
                toggled = Some(kind.clone());
            }
        }
        let field = ui.add(egui::TextEdit::singleline(&mut new_type).hint_text("new type").desired_width(110.0));
        if field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) && !new_type.trim().is_empty() {
            added = Some(new_type.trim().to_string());
            new_type.clear();
        }
    });
    ui.data_mut(|d| d.insert_temp(id, new_type));
    if let Some(kind) = &added {
        if !studio.project.defect_types.contains(kind) {
            studio.project.defect_types.push(kind.clone());
        }
        toggled = Some(kind.clone());
    }
    if let Some(kind) = toggled {
        let label = studio.project.labels.entry(key.to_string()).or_default();
        match label.defect_types.iter().position(|k| *k == kind) {
            Some(at) if added.is_none() => {
                label.defect_types.remove(at);
            }
            Some(_) => {}
            None => {
                label.defect_types.push(kind);
                // A defect type implies the verdict.
                label.verdict.get_or_insert(Verdict::Defect);
            }
        }
        if label.is_empty() {
            studio.project.labels.remove(key);
        }
        studio.changed();
    }
}
