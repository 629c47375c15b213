//! Entering and leaving presentation mode (the view itself: `views/present.rs`).

use super::*;

impl StudioApp {
    /// Enters or leaves presentation mode: the window full screen with the presentation alone, or back.
    pub fn present(&mut self, ctx: &egui::Context, on: bool) {
        self.presenting = on;
        ctx.send_viewport_cmd(egui::ViewportCommand::Fullscreen(on));
        if let (false, Some(size)) = (on, self.windowed_size.take()) {
            ctx.send_viewport_cmd(egui::ViewportCommand::InnerSize(size));
        }
    }

    /// Without a window manager (a bare X server, some kiosk set-ups) a full-screen request does nothing: then
    /// the window is sized to the monitor by hand, and given its size back when the presentation ends.
    pub(super) fn fill_the_screen(&mut self, ctx: &egui::Context) {
        let (monitor, inner) = ctx.input(|i| (i.viewport().monitor_size, i.viewport().inner_rect.map(|r| r.size())));
        let (Some(monitor), Some(inner)) = (monitor, inner) else { return };
        // The window's own fullscreen flag is no help: winit reports it set even where nothing honoured it.
        if (inner - monitor).length() > 1.0 {
            self.windowed_size.get_or_insert(inner);
            ctx.send_viewport_cmd(egui::ViewportCommand::OuterPosition(egui::Pos2::ZERO));
            ctx.send_viewport_cmd(egui::ViewportCommand::InnerSize(monitor));
        }
    }

    pub fn is_presenting(&self) -> bool {
        self.presenting
    }

    /// The presentation's playlist and comparison choices.
    pub fn presentation(&mut self) -> &mut views::present::PresentState {
        &mut self.views.present
    }
}
