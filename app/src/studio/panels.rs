//! The window's fixed parts: banners (messages, missing weights), the status bar, the project panel.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MessageKind {
    Info,
    Error,
}

pub(super) struct Message {
    pub(super) kind: MessageKind,
    pub(super) text: String,
    pub(super) details: Vec<String>,
}

impl StudioApp {
    pub(super) fn banners(&mut self, ui: &mut egui::Ui) {
        if !self.weights_present() {
            ui.horizontal(|ui| {
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("The ImageNet backbone weights are missing ({}).", self.weights.display()),
                );
                let fetching = self.job.is_some();
                if ui.add_enabled(!fetching, egui::Button::new("Fetch weights")).clicked() {
                    self.start_weights_fetch(ui.ctx());
                }
            });
        }
        let mut dismissed = None;
        for (index, message) in self.messages.iter().enumerate().rev().take(4) {
            ui.horizontal(|ui| {
                if ui.small_button("Dismiss").clicked() {
                    dismissed = Some(index);
                }
                let colour = match message.kind {
                    MessageKind::Error => ui.visuals().error_fg_color,
                    MessageKind::Info => ui.visuals().text_color(),
                };
                ui.colored_label(colour, &message.text);
            });
            if !message.details.is_empty() {
                egui::CollapsingHeader::new(format!("{} details", message.details.len()))
                    .id_salt(("message", index))
                    .show(ui, |ui| {
                        egui::ScrollArea::vertical().max_height(120.0).show(ui, |ui| {
                            for line in &message.details {
                                ui.label(line);
                            }
                        });
                    });
            }
        }
        if let Some(index) = dismissed {
            self.messages.remove(index);
        }
    }

    pub(super) fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(job) = &self.job {
                let status = job.status();
                ui.label(format!("{}: {}", status.title, status.stage));
                let mut bar = egui::ProgressBar::new(status.fraction().unwrap_or(0.0)).desired_width(220.0);
                bar = match (status.fraction(), status.eta()) {
                    (Some(f), Some(eta)) => {
                        bar.text(format!("{:.0} % · {} left", f * 100.0, views::format_duration(eta)))
                    }
                    (Some(f), None) => bar.text(format!("{:.0} %", f * 100.0)),
                    (None, _) => bar.animate(true),
                };
                ui.add(bar);
                let cancelling = job.is_cancelling();
                if ui
                    .add_enabled(!cancelling, egui::Button::new(if cancelling { "Cancelling…" } else { "Cancel" }))
                    .clicked()
                {
                    job.cancel();
                }
            } else {
                ui.label(format!("{} images", self.studio.images.len()));
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(self.frame_stats.summary());
                ui.separator();
                let saved = if self.saver.is_busy() {
                    "saving…".to_string()
                } else if self.studio.revision == self.saver.saved_revision() {
                    "all changes saved".to_string()
                } else if self.saver.recently_failed() {
                    "NOT SAVED — retrying".to_string()
                } else {
                    "unsaved changes".to_string()
                };
                ui.label(saved).on_hover_text(self.studio.path.display().to_string());
            });
        });
    }

    pub(super) fn project_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading(&self.studio.project.name);
        ui.label(egui::RichText::new(self.studio.path.display().to_string()).small().weak());
        ui.separator();
        ui.strong("Sources");
        let mut relink = None;
        for (index, source) in self.studio.project.sources.iter().enumerate() {
            let mut opened_now = false;
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("{} — {}", source.root().display(), source.kind_label()));
                let hint = format!("point {} at its new place (the folder moved)", source.place().display());
                if ui.small_button("Relink…").on_hover_text(hint).clicked() {
                    self.relinking = Some((index, String::new()));
                    opened_now = true;
                }
            });
            if let Some((at, typed)) = self.relinking.as_mut().filter(|(at, _)| *at == index) {
                ui.horizontal(|ui| {
                    let field = egui::TextEdit::singleline(typed)
                        .id_salt(("relink", index))
                        .hint_text("the folder's new place")
                        .desired_width(220.0);
                    let field = ui.add(field);
                    if opened_now {
                        field.request_focus();
                    }
                    if ui.button("Apply").clicked() {
                        relink = Some((*at, PathBuf::from(typed.trim())));
                    }
                });
            }
        }
        if let Some((index, new_root)) = relink {
            self.relinking = None;
            if !new_root.is_dir() {
                self.error(format!("{}: no such folder; the source is unchanged", new_root.display()));
            } else {
                let stored = relative_to(&self.studio.dir(), &new_root);
                match self.studio.project.relink_source(index, stored) {
                    Ok(()) => {
                        self.studio.changed();
                        self.start_import(ui.ctx());
                    }
                    Err(error) => self.error(format!("{error:#}")),
                }
            }
        }
        if self.studio.project.sources.is_empty() {
            ui.label("none: use Import to add a folder, or drop one here");
        }
        let count = |split| self.studio.images.iter().filter(|i| i.split == split).count();
        let (train, test, inspect) =
            (count(sources::Split::Train), count(sources::Split::Test), count(sources::Split::Inspect));
        ui.label(format!("{train} training images, {test} test images"));
        if inspect > 0 {
            ui.label(format!("{inspect} images to inspect"));
        }
        ui.separator();
        ui.strong("Models");
        let mut activate = None;
        for (index, entry) in self.studio.project.models.iter().enumerate() {
            let active = self.studio.project.active_model == Some(index);
            if ui.selectable_label(active, &entry.name).clicked() && !active {
                activate = Some(index);
            }
        }
        if self.studio.project.models.is_empty() {
            ui.label("none yet: open Train");
        }
        if let Some(index) = activate {
            self.studio.project.active_model = Some(index);
            self.studio.changed();
            if self.studio.runtimes[index].model.is_none() {
                self.start_reload(ui.ctx(), index);
            }
        }
    }
}
