//! The studio window driven headless through egui_kittest with the wgpu renderer (Mesa's software Vulkan on a
//! machine without a GPU): open a project, train PatchCore on a tiny synthetic set, drag the decision threshold
//! and check the FAR/MAR and confusion counts shown against the engine's own computation, and check that the
//! inspector's paint-callback overlay really draws.

use eframe::egui;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::{Harness, SnapshotOptions};
use loupe::project::sources::Split;
use loupe::project::{Project, Source};
use loupe::studio::workspace::{reported_path, ImageId};
use loupe::studio::{StudioApp, StudioOptions, View};
use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use loupe_engine::metrics::ThresholdTable;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-studio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A project over a tiny synthetic benchmark, trained with small PatchCore settings.
fn tiny_project(dir: &Path) -> PathBuf {
    generate_mvtec(&dir.join("data"), &SyntheticSpec::tiny(11)).unwrap();
    let mut project = Project::new("tiny");
    project.sources.push(Source::Benchmark("data".into()));
    project.training.image_size = 96;
    project.training.target_far = 0.05;
    project.training.settings_json = r#"{"coreset_ratio":0.25}"#.into();
    let path = dir.join("tiny.ron");
    project.save(&path).unwrap();
    path
}

fn harness(project: PathBuf, view: Option<View>) -> Harness<'static, StudioApp> {
    let options = StudioOptions {
        project: Some(project),
        weights: loupe_engine::backbone::weights::default_weights_path(),
        remember_last: false,
        auto_train: false,
        exit_when_idle: false,
        frame_stats: None,
        view,
        present: false,
    };
    Harness::builder().with_size(egui::vec2(1280.0, 820.0)).wgpu().build_eframe(|cc| StudioApp::new(cc, options))
}

/// The tiny project opened in the Train view, imported, and PatchCore trained from its button.
fn trained_tiny_project(dir: &Path) -> (PathBuf, Harness<'static, StudioApp>) {
    let project = tiny_project(dir);
    let mut harness = harness(project.clone(), Some(View::Train));
    wait_until_idle(&mut harness, "the import");
    harness.get_by_label("Train PatchCore").click();
    harness.run_steps(2);
    wait_until_idle(&mut harness, "training");
    (project, harness)
}

/// Steps the UI until the background work is done (import, training, autosave).
fn wait_until_idle(harness: &mut Harness<'_, StudioApp>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        harness.step();
        if harness.state().is_idle() {
            break;
        }
        assert!(Instant::now() < deadline, "{what} did not finish; messages: {:?}", harness.state().messages());
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.run_steps(4);
}

/// Presses the pointer at `from`, moves to `to` over a few frames, releases.
fn drag(harness: &mut Harness<'_, StudioApp>, from: egui::Pos2, to: egui::Pos2) {
    harness.drag_at(from);
    harness.step();
    for i in 1..=4 {
        harness.hover_at(from + (to - from) * (i as f32 / 4.0));
        harness.step();
    }
    harness.drop_at(to);
    harness.run_steps(3);
}

/// The texts the threshold panel must show, written out here from the engine's confusion rather than through the
/// view's own formatter, so a wrong count or a wrong rate in the view fails the test.
fn expected_texts(table: &ThresholdTable, threshold: f32) -> Vec<String> {
    let c = table.confusion(threshold);
    let percent = |r: Option<f64>| format!("{:.2} %", r.unwrap() * 100.0);
    vec![
        format!(
            "FAR {} ({} of {} good parts rejected)",
            percent(c.far()),
            c.false_positive,
            c.false_positive + c.true_negative
        ),
        format!(
            "MAR {} ({} of {} defects passed)",
            percent(c.mar()),
            c.false_negative,
            c.false_negative + c.true_positive
        ),
        format!("true rejects (TP) {}", c.true_positive),
        format!("false alarms (FP) {}", c.false_positive),
        format!("true passes (TN) {}", c.true_negative),
        format!("misses (FN) {}", c.false_negative),
    ]
}

#[test]
fn train_then_drag_the_threshold_and_watch_far_and_mar() {
    let dir = temp_dir("threshold");
    let mut harness = harness(tiny_project(&dir), None);
    wait_until_idle(&mut harness, "the import");
    assert_eq!(harness.state().studio.images.len(), 24 + 8 + 3 * 4, "every synthetic image imported");

    harness.get_by_label("Train").click();
    harness.run_steps(2);
    // Settings are shown in words (the engine's setting docs), the key in the hover text.
    harness.get_by_label("Memory bank share");
    // The method in two lines: what it models, when it wins and its measured CPU cost.
    harness.get_by_label(loupe_engine::methods::representation::patchcore::INFO.guide);
    harness.get_by_label("Train PatchCore").click();
    harness.run_steps(2);
    wait_until_idle(&mut harness, "training");
    assert!(harness.state().messages().is_empty(), "{:?}", harness.state().messages());
    assert_eq!(harness.state().studio.project.models.len(), 1);

    // The engine's own view of the scores: the evaluation stored with the model.
    let entry = harness.state().studio.project.models[0].clone();
    let report = entry.evaluations.values().next().expect("the benchmark was evaluated");
    let scores: Vec<f32> = report.images.iter().map(|i| i.score).collect();
    let labels: Vec<bool> = report.images.iter().map(|i| i.defect_type != "good").collect();
    let table = ThresholdTable::new(&scores, &labels);
    assert!(report.image_auroc > 0.9, "PatchCore separates the tiny set: AUROC {}", report.image_auroc);

    // Training opens the threshold panel; the slider is found by its role and label.
    let slider = harness.get_by_role_and_label(accesskit::Role::Slider, "Decision threshold").rect();
    let before = harness.state().studio.project.models[0].decision.expect("a threshold was chosen at fit time");
    let shown_before = expected_texts(&table, before);
    for text in &shown_before {
        harness.get_by_label(text);
    }

    // Drag the handle to the far left: every image is rejected, FAR becomes 100 %.
    let y = slider.center().y;
    drag(&mut harness, egui::pos2(slider.left() + slider.width() * 0.5, y), egui::pos2(slider.left() + 1.0, y));
    let low = harness.state().studio.project.models[0].decision.unwrap();
    assert!(low < before, "dragging left lowers the threshold ({before} -> {low})");
    for text in expected_texts(&table, low) {
        harness.get_by_label(&text);
    }
    assert_eq!(table.confusion(low).far(), Some(1.0));
    assert!(harness.query_by_label(&shown_before[0]).is_none(), "the old FAR is no longer shown");

    // And to the far right: nothing is rejected, MAR becomes 100 %.
    drag(&mut harness, egui::pos2(slider.left() + 1.0, y), egui::pos2(slider.right() - 1.0, y));
    let high = harness.state().studio.project.models[0].decision.unwrap();
    for text in expected_texts(&table, high) {
        harness.get_by_label(&text);
    }
    assert_eq!(table.confusion(high).mar(), Some(1.0));
    assert!(harness.query_by_label(&shown_before[1]).is_none(), "the old MAR is no longer shown");

    // The chosen threshold is autosaved into the project and into the model file.
    wait_until_idle(&mut harness, "the autosave");
    let saved = Project::load(&harness.state().studio.path).unwrap();
    assert_eq!(saved.models[0].decision, Some(high));
    let model_file = dir.join(&saved.models[0].file);
    let manifest = loupe_engine::model_file::read_manifest(&model_file).unwrap();
    assert_eq!(manifest.thresholds.decision, Some(high));

    // Reopening restores exactly what was there: the model reloads from its file and re-scores every test image
    // to the same scores, so nothing in the project changes.
    let path = harness.state().studio.path.clone();
    drop(harness);
    let mut reopened = self::harness(path.clone(), None);
    wait_until_idle(&mut reopened, "reopening");
    assert!(reopened.state().messages().is_empty(), "{:?}", reopened.state().messages());
    assert_eq!(reopened.state().studio.project, saved);
    assert!(reopened.state().studio.active_runtime().is_some_and(|r| r.model.is_some() && !r.maps.is_empty()));
    assert_eq!(Project::load(&path).unwrap(), saved, "reopening rewrote nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_project_is_reported_and_left_untouched_and_bad_images_are_listed() {
    let dir = temp_dir("corrupt");
    let corrupt = dir.join("broken.ron");
    let text = "(format_version: 1, name: \"half a file\", sources: [Benchm";
    std::fs::write(&corrupt, text).unwrap();
    // The studio falls back to the demo project in its own data folder: point that at the temp dir.
    std::env::set_var("LOUPE_HOME", dir.join("home"));
    let mut harness = harness(corrupt.clone(), Some(View::Gallery));
    wait_until_idle(&mut harness, "opening the demo project instead");
    let messages = harness.state().messages();
    assert!(messages.iter().any(|m| m.contains("broken.ron") && m.contains("left untouched")), "{messages:?}");
    assert_ne!(harness.state().studio.path, corrupt, "the corrupt file is not the open project");
    drop(harness);
    assert_eq!(std::fs::read_to_string(&corrupt).unwrap(), text);

    // One unreadable image among good ones: listed with its reason, the rest imported.
    let project = tiny_project(&dir);
    std::fs::write(dir.join("data/train/good/zz_truncated.png"), b"\x89PNG\r\n\x1a\n\0\0").unwrap();
    let mut harness = self::harness(project, Some(View::Gallery));
    wait_until_idle(&mut harness, "the import");
    assert_eq!(harness.state().studio.images.len(), 24 + 8 + 3 * 4);
    assert_eq!(harness.state().studio.skipped.len(), 1);
    assert!(harness.state().studio.skipped[0].contains("zz_truncated.png"), "{:?}", harness.state().studio.skipped);
    harness.get_by_label("1 files could not be read (the rest were imported)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pixels with clearly saturated colour (the overlay's colormap; the synthetic tiles and the UI are grey).
fn saturated_pixels(image: &image::RgbaImage) -> usize {
    image
        .pixels()
        .filter(|p| {
            let (max, min) = (p.0[..3].iter().max().unwrap(), p.0[..3].iter().min().unwrap());
            max - min > 80
        })
        .count()
}

#[test]
fn the_inspector_overlay_is_drawn_by_the_paint_callback() {
    let dir = temp_dir("inspector");
    let mut harness = harness(tiny_project(&dir), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let ctx = harness.ctx.clone();
    harness.state_mut().start_training(&ctx);
    wait_until_idle(&mut harness, "training");
    let defect = harness
        .state()
        .studio
        .images
        .iter()
        .position(|i| i.label.type_name() == "scratch" && i.mask.is_some())
        .expect("a scratch with a mask");
    harness.state_mut().studio.selected = Some(defect);
    // The full image decodes off the UI thread: step until it is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !harness.state().is_image_loaded(defect) {
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
        assert!(Instant::now() < deadline, "the inspector did not show the image");
    }
    harness.run_steps(4);
    let with_overlay = harness.render().expect("wgpu renders headless");

    // Opacity 0 and no contours: the same view without the overlay.
    harness.get_by_role_and_label(accesskit::Role::Slider, "opacity").set_value_accesskit(0.0);
    harness.get_by_label("threshold contour").click();
    harness.get_by_label("ground-truth outline").click();
    harness.run_steps(3);
    let without = harness.render().unwrap();
    let (coloured, plain) = (saturated_pixels(&with_overlay), saturated_pixels(&without));
    assert!(coloured > plain + 5_000, "the overlay adds colour: {coloured} saturated pixels with it, {plain} without");

    // Put the overlay back for the snapshot; mask what differs between runs (paths, timings, scores).
    harness.get_by_role_and_label(accesskit::Role::Slider, "opacity").set_value_accesskit(0.6);
    harness.get_by_label("threshold contour").click();
    harness.get_by_label("ground-truth outline").click();
    harness.run_steps(3);
    harness.mask(egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(230.0, 820.0)));
    harness.mask(egui::Rect::from_min_max(egui::pos2(0.0, 780.0), egui::pos2(1280.0, 820.0)));
    harness.mask(egui::Rect::from_min_max(egui::pos2(230.0, 25.0), egui::pos2(1280.0, 50.0)));
    let options = SnapshotOptions::new().output_path("../tests/snapshots").threshold(2.0).max_failed_pixels(4_000);
    harness.snapshot_options("inspector_overlay", &options);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Labelling by keyboard in the inspector: G, D and U label the image shown and move on to the next; the labels
/// are autosaved into the project (keyed by source and path inside it) and are there when it is reopened.
#[test]
fn label_images_by_keyboard_and_find_the_labels_after_reopening() {
    use loupe_engine::labels::Verdict;
    let dir = temp_dir("labelling");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let mut expected = Vec::new();
    for (key, verdict) in
        [(egui::Key::G, Verdict::Good), (egui::Key::D, Verdict::Defect), (egui::Key::U, Verdict::Unsure)]
    {
        let shown = harness.state().studio.selected.expect("the inspector shows an image");
        expected.push((harness.state().studio.images[shown].label_key.clone(), verdict));
        harness.key_press(key);
        harness.run_steps(2);
        assert_ne!(harness.state().studio.selected, Some(shown), "a key moves on to the next image");
    }
    // A new defect type typed into the field tags the image shown (and makes it a defect).
    let shown = harness.state().studio.selected.unwrap();
    let shown_key = harness.state().studio.images[shown].label_key.clone();
    harness.get_by_role(accesskit::Role::TextInput).click();
    harness.run_steps(2);
    harness.get_by_role(accesskit::Role::TextInput).type_text("crack");
    harness.run_steps(1);
    harness.key_press(egui::Key::Enter);
    harness.run_steps(2);
    let tagged = harness.state().studio.project.labels.get(&shown_key).cloned().unwrap_or_default();
    assert_eq!(tagged.defect_types, ["crack"], "{tagged:?}");
    assert_eq!(tagged.verdict, Some(Verdict::Defect));
    assert_eq!(harness.state().studio.selected, Some(shown), "typing does not label or move on");
    expected.push((shown_key, Verdict::Defect));
    let keys: Vec<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.iter().all(|k| k.starts_with("data/")), "keys name the source and the path inside it: {keys:?}");
    wait_until_idle(&mut harness, "the autosave");
    drop(harness);

    let mut reopened = self::harness(project, Some(View::Gallery));
    wait_until_idle(&mut reopened, "reopening");
    for (key, verdict) in &expected {
        let labels = &reopened.state().studio.project.labels;
        assert_eq!(labels.get(key).and_then(|l| l.verdict), Some(*verdict), "{key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The mask of image `index` as the studio holds it, waiting for it to be read from disk when it must be.
fn mask_in_studio(harness: &mut Harness<'_, StudioApp>, index: usize) -> loupe_engine::labels::mask::DefectMask {
    use loupe::studio::mask_edits::MaskState;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let studio = &mut harness.state_mut().studio;
        let image = &studio.images[index];
        let (key, size) = (image.label_key.clone(), [image.original_size[0] as u32, image.original_size[1] as u32]);
        let file = studio.label_of(index).and_then(|l| l.mask.as_ref()).map(|m| studio.dir().join(m));
        match studio.masks.get(&key, file, size, || {}) {
            MaskState::Ready(edited) => return edited.mask.clone(),
            MaskState::Failed(reason) => panic!("the mask of {key} cannot be read: {reason}"),
            MaskState::Loading => {}
        }
        assert!(Instant::now() < deadline, "the mask of {key} did not load");
        harness.step();
    }
}

fn click(harness: &mut Harness<'_, StudioApp>, at: egui::Pos2) {
    harness.hover_at(at);
    harness.step();
    harness.drag_at(at);
    harness.step();
    harness.drop_at(at);
    // More than egui's double-click interval passes before the next click.
    harness.run_steps(2);
}

/// Rows of the mask with at least one defect pixel.
fn painted_rows(mask: &loupe_engine::labels::mask::DefectMask) -> Vec<u32> {
    (0..mask.height()).filter(|&y| (0..mask.width()).any(|x| mask.get(x, y))).collect()
}

/// Paint a defect mask with simulated drags and clicks (brush, fill, polygon), walk the undo/redo history by
/// keyboard, and find the mask — as a PNG at the image's resolution, referenced from the label — after reopening.
#[test]
fn paint_a_mask_undo_redo_and_find_it_after_reopening() {
    use loupe_engine::labels::Verdict;
    let dir = temp_dir("mask-painting");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let shown = harness.state().studio.selected.expect("the inspector shows an image");
    let key = harness.state().studio.images[shown].label_key.clone();
    while !harness.state().is_image_loaded(shown) {
        harness.step();
    }
    harness.run_steps(2);
    let size = harness.state().studio.images[shown].original_size;

    // A brush stroke right across the window, through the middle of the image.
    harness.key_press(egui::Key::B);
    harness.run_steps(1);
    let middle = 470.0;
    drag(&mut harness, egui::pos2(250.0, middle), egui::pos2(1275.0, middle));
    let stroke = mask_in_studio(&mut harness, shown);
    assert_eq!((stroke.width() as usize, stroke.height() as usize), (size[0], size[1]), "full resolution");
    let rows = painted_rows(&stroke);
    assert!(!rows.is_empty(), "the stroke painted");
    assert!(rows.len() <= 16, "a band about the brush's width: rows {rows:?}");
    let row = rows[rows.len() / 2];
    assert!((0..stroke.width()).all(|x| stroke.get(x, row)), "the band crosses the whole image");
    let label = harness.state().studio.project.labels.get(&key).cloned().unwrap_or_default();
    assert_eq!(label.verdict, Some(Verdict::Defect), "a painted mask makes the image a defect");

    // Fill above the band: everything above it is one region.
    harness.key_press(egui::Key::F);
    harness.run_steps(1);
    click(&mut harness, egui::pos2(760.0, middle - 100.0));
    let filled = mask_in_studio(&mut harness, shown);
    assert!((0..rows[0]).all(|y| filled.get(0, y) && filled.get(filled.width() - 1, y)), "the region above filled");
    assert!(!filled.get(0, filled.height() - 1), "the region below the band is another one");

    // Undo the fill; draw a triangle below the band with the polygon tool (closing on its first corner).
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    harness.run_steps(1);
    assert_eq!(mask_in_studio(&mut harness, shown), stroke, "undo takes the fill back");
    harness.key_press(egui::Key::P);
    harness.run_steps(1);
    let corners =
        [egui::pos2(700.0, middle + 60.0), egui::pos2(820.0, middle + 60.0), egui::pos2(760.0, middle + 160.0)];
    for corner in corners.iter().chain(&corners[..1]) {
        click(&mut harness, *corner);
    }
    let with_triangle = mask_in_studio(&mut harness, shown);
    let triangle = with_triangle.defect_pixels() - stroke.defect_pixels();
    assert!(triangle > 20, "the triangle filled {triangle} pixels");
    assert!(painted_rows(&with_triangle).iter().any(|&y| y > rows[rows.len() - 1] + 5), "below the band");

    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Z);
    harness.run_steps(1);
    assert_eq!(mask_in_studio(&mut harness, shown), stroke, "undo takes the triangle back");
    harness.key_press_modifiers(egui::Modifiers::COMMAND | egui::Modifiers::SHIFT, egui::Key::Z);
    harness.run_steps(1);
    assert_eq!(mask_in_studio(&mut harness, shown), with_triangle, "redo brings it again");
    wait_until_idle(&mut harness, "the autosave");
    drop(harness);

    let saved = Project::load(&project).unwrap();
    let file = saved.labels.get(&key).and_then(|l| l.mask.clone()).expect("the label refers to its mask");
    assert!(file.is_relative() && file.starts_with("masks"), "{}", file.display());
    let on_disk = loupe_engine::labels::mask::DefectMask::read(&dir.join(&file)).unwrap();
    assert_eq!(on_disk, with_triangle, "the PNG holds the mask as painted");

    let mut reopened = self::harness(project, Some(View::Inspector));
    wait_until_idle(&mut reopened, "reopening");
    assert_eq!(mask_in_studio(&mut reopened, shown), with_triangle, "the reopened studio shows the same mask");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The region of interest drawn on the inspector's image: four clicked corners close on the first and become
/// the Train view's region, in image pixels, without painting the defect mask; the Train view shows it as text
/// and offers tiles; it is autosaved with the project and "clear" takes it away.
#[test]
fn draw_a_region_of_interest_in_the_inspector() {
    let dir = temp_dir("region");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let shown = harness.state().studio.selected.expect("the inspector shows an image");
    while !harness.state().is_image_loaded(shown) {
        harness.step();
    }
    harness.run_steps(2);
    let [width, height] = harness.state().studio.images[shown].original_size.map(|side| side as f32);

    harness.get_by_label("draw").click();
    harness.run_steps(2);
    let corners = [(660.0, 380.0), (860.0, 380.0), (860.0, 580.0), (660.0, 580.0), (660.0, 380.0)];
    for (x, y) in corners {
        click(&mut harness, egui::pos2(x, y));
    }
    let geometry = harness.state().studio.project.training.geometry.clone();
    let region = geometry.region.expect("closing the polygon sets the region");
    let points = &region.points;
    assert_eq!(points.len(), 4, "{points:?}");
    let (side_x, side_y) = (points[1][0] - points[0][0], points[3][1] - points[0][1]);
    assert!(side_x > 1.0 && (side_x - side_y).abs() < 0.5, "a square in image pixels: {points:?}");
    assert!((points[0][1] - points[1][1]).abs() < 0.01 && (points[0][0] - points[3][0]).abs() < 0.01, "{points:?}");
    assert!(points.iter().all(|&[x, y]| (0.0..=width).contains(&x) && (0.0..=height).contains(&y)), "{points:?}");
    let grid = harness.get_by_label("tile grid").accesskit_node().toggled();
    assert_eq!(grid, Some(accesskit::Toggled::True), "the grid shows the region while it is drawn");
    assert_eq!(mask_in_studio(&mut harness, shown).defect_pixels(), 0, "drawing the region paints no mask");
    wait_until_idle(&mut harness, "the autosave");
    assert_eq!(Project::load(&project).unwrap().training.geometry.region.as_ref(), Some(&region), "autosaved");

    // The Train view shows the drawn region as its text, and tiles with the scale each is seen at.
    harness.get_by_label("Train").click();
    harness.run_steps(3);
    let text = harness.get_by_label("region of interest (image px)").accesskit_node().value().unwrap_or_default();
    let corners: Vec<f32> = text.split([',', ';']).map(|n| n.trim().parse().unwrap()).collect();
    assert_eq!(corners, points.iter().flatten().copied().collect::<Vec<_>>(), "{text}");
    harness.get_by_label("input").click();
    harness.run_steps(2);
    harness.get_by_label("tiles (high-resolution parts)").click();
    harness.run_steps(3);
    assert!(harness.query_by_label("tile side (image px)").is_some(), "tiles have a side");
    harness.get_by_label("each tile is scaled by 0.19 to the 96² input (5.3 image px per input px)");
    let layout = harness.state().studio.project.training.geometry.layout;
    assert_eq!(layout, loupe_engine::geometry::Layout::Tiles { tile: 512, overlap: 64 });

    harness.get_by_label("Inspector").click();
    harness.run_steps(3);
    harness.get_by_label("clear").click();
    harness.run_steps(2);
    assert_eq!(harness.state().studio.project.training.geometry.region, None, "clear takes the region away");
    wait_until_idle(&mut harness, "the autosave");
    drop(harness);
    assert_eq!(Project::load(&project).unwrap().training.geometry.region, None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Images to inspect (a folder of new parts) are scored but not trained on, and triage puts the most suspicious
/// first. The labeller's verdicts — given by key and by accepting or rejecting the model's verdict in review —
/// become a ground truth of their own: re-evaluating judges the model against them ("your labels", new parts
/// included), and the threshold panel computes FAR and MAR from them when chosen.
#[test]
fn your_labels_become_the_ground_truth_of_the_threshold_panel() {
    use loupe::studio::workspace::YOUR_LABELS;
    use loupe_engine::labels::{ReviewAnswer, Verdict};
    let dir = temp_dir("your-labels");
    let project = tiny_project(&dir);
    // New parts to inspect: copies of the first image of each test folder (at most two of either class: here one
    // good, two defective), without their folders' names.
    let new_parts = dir.join("new-parts");
    std::fs::create_dir_all(&new_parts).unwrap();
    let test_dir = dir.join("data/test");
    let mut copied = Vec::new();
    for folder in std::fs::read_dir(&test_dir).unwrap().map(|e| e.unwrap().path()) {
        let defective = !folder.ends_with("good");
        let first = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).min().unwrap();
        if copied.iter().filter(|(_, d)| *d == defective).count() < 2 {
            let to = new_parts.join(format!("part-{}.png", copied.len()));
            std::fs::copy(&first, &to).unwrap();
            copied.push((to, defective));
        }
    }
    let mut with_parts = Project::load(&project).unwrap();
    with_parts.sources.push(Source::Inspect("new-parts".into()));
    with_parts.save(&project).unwrap();
    let mut harness = harness(project, Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let ctx = harness.ctx.clone();
    harness.state_mut().start_training(&ctx);
    wait_until_idle(&mut harness, "training");

    // The images to inspect are scored (not trained on, in no folder evaluation) and triage puts the most
    // suspicious unlabelled one first.
    let inspected = harness.state().studio.project.models[0].inspected.clone();
    assert_eq!(inspected.len(), copied.len(), "{inspected:?}");
    let trained_on = harness.state().studio.project.models[0].images_used;
    assert!(trained_on <= 24, "only the training images trained ({trained_on})");
    let most_suspicious = inspected.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0.clone();
    let defect_scores: Vec<f32> =
        copied.iter().filter(|c| c.1).map(|c| inspected[&c.0.display().to_string()]).collect();
    let good_scores: Vec<f32> = copied.iter().filter(|c| !c.1).map(|c| inspected[&c.0.display().to_string()]).collect();
    assert!(defect_scores.iter().all(|d| good_scores.iter().all(|g| d > g)), "{defect_scores:?} vs {good_scores:?}");
    {
        let app = harness.state();
        use loupe::studio::views::gallery::{GalleryState, SortOrder};
        let gallery = GalleryState { sort: SortOrder::Triage, split: Some(Split::Inspect), ..Default::default() };
        let order = gallery.order(&app.studio);
        assert_eq!(order.len(), copied.len());
        assert_eq!(reported_path(&app.studio.images[order[0]].path), most_suspicious);
    }
    let decision = harness.state().studio.project.models[0].decision.expect("a threshold");
    let test_images: Vec<(usize, bool, f32)> = {
        let studio = &harness.state().studio;
        studio
            .images
            .iter()
            .enumerate()
            .filter_map(|(i, image)| Some((i, image.label.is_anomalous(), studio.score_of(image)?)))
            .collect()
    };
    let goods: Vec<_> = test_images.iter().filter(|t| !t.1).take(3).copied().collect();
    let defects: Vec<_> = test_images.iter().filter(|t| t.1).take(3).copied().collect();
    let key_of =
        |harness: &Harness<'_, StudioApp>, index: usize| harness.state().studio.images[index].label_key.clone();
    let press = |harness: &mut Harness<'_, StudioApp>, index: usize, key: egui::Key| {
        harness.state_mut().studio.selected = Some(index);
        harness.run_steps(1);
        harness.key_press(key);
        harness.run_steps(2);
    };
    // The second good image is labelled good through review: accept the model's pass or reject its reject.
    let (g2, _, g2_score) = goods[1];
    let answer = if g2_score >= decision { egui::Key::R } else { egui::Key::A };
    press(&mut harness, g2, answer);
    let label = harness.state().studio.project.labels.get(&key_of(&harness, g2)).cloned().unwrap_or_default();
    assert_eq!(label.verdict, Some(Verdict::Good), "{label:?}");
    let expected_answer = if answer == egui::Key::A { ReviewAnswer::Accepted } else { ReviewAnswer::Rejected };
    assert_eq!(label.review, Some(expected_answer));
    // The labeller disagrees with the folders about goods[2] and defects[2].
    let verdicts = [
        (goods[0].0, egui::Key::G, false),
        (goods[2].0, egui::Key::D, true),
        (defects[0].0, egui::Key::D, true),
        (defects[1].0, egui::Key::D, true),
        (defects[2].0, egui::Key::G, false),
    ];
    for (index, key, _) in verdicts {
        press(&mut harness, index, key);
    }

    // The labeller calls the first defective new part a defect.
    let part = copied.iter().find(|c| c.1).unwrap().0.display().to_string();
    let part_index = harness.state().studio.images.iter().position(|i| reported_path(&i.path) == part).unwrap();
    press(&mut harness, part_index, egui::Key::D);

    harness.get_by_label("Threshold").click();
    harness.run_steps(2);
    harness.get_by_label("Re-evaluate with your labels").click();
    harness.run_steps(1);
    wait_until_idle(&mut harness, "re-evaluating");
    let report = harness.state().studio.project.models[0].evaluations.get(YOUR_LABELS).cloned().expect("evaluated");
    let mut expected: Vec<(String, &str)> = verdicts
        .iter()
        .map(|&(index, _, defect)| (index, defect))
        .chain([(g2, false), (part_index, true)])
        .map(|(index, defect)| {
            (reported_path(&harness.state().studio.images[index].path), if defect { "untyped" } else { "good" })
        })
        .collect();
    let mut got: Vec<(String, &str)> = report.images.iter().map(|i| (i.path.clone(), i.defect_type.as_str())).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "the labeller's verdicts are the ground truth");

    harness.get_by_label("your labels (3 good, 4 defective)").click();
    harness.run_steps(2);
    let table = harness.state().studio.active_runtime().unwrap().labels_table.clone();
    let decision = harness.state().studio.project.models[0].decision.unwrap();
    for text in expected_texts(&table, decision) {
        harness.get_by_label(&text);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A project folder that refuses the write (here the save's temp file cannot be created: a folder stands where it
/// goes — unlike file permissions, this also stops a test run as root): the studio says so, the previous file
/// stays as it was, the edit stays in memory, and the retry writes it once the folder accepts writes again.
#[test]
fn a_refused_save_is_reported_keeps_the_edit_and_the_old_file_and_is_retried() {
    use loupe_engine::labels::Verdict;
    let dir = temp_dir("refused-save");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let before = std::fs::read(&project).unwrap();
    loupe_engine::atomic_file::refuse_writes_in(&dir, true);

    let shown = harness.state().studio.selected.expect("an image is shown");
    let key = harness.state().studio.images[shown].label_key.clone();
    harness.key_press(egui::Key::G);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !harness.state().messages().iter().any(|m| m.contains("could not save")) {
        assert!(Instant::now() < deadline, "no message; messages: {:?}", harness.state().messages());
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    harness.run_steps(2);
    harness.get_by_label_contains("could not save");
    let text = harness.state().messages().into_iter().find(|m| m.contains("could not save")).unwrap();
    assert!(text.contains("kept in memory") && text.contains(".tiny.ron."), "names the file: {text}");
    assert_eq!(std::fs::read(&project).unwrap(), before, "the previous file is intact");
    let in_memory = harness.state().studio.project.labels.get(&key).and_then(|l| l.verdict);
    assert_eq!(in_memory, Some(Verdict::Good), "the edit is kept in memory");

    loupe_engine::atomic_file::refuse_writes_in(&dir, false);
    wait_until_idle(&mut harness, "the retried save");
    let saved = Project::load(&project).unwrap();
    assert_eq!(saved.labels.get(&key).and_then(|l| l.verdict), Some(Verdict::Good), "written once possible");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The images' folder moved (and was renamed): the import says so, the user relinks the source from the project
/// panel, the images come back and the labels follow them.
#[test]
fn relink_a_moved_folder_and_the_labels_follow() {
    use loupe_engine::labels::Verdict;
    let dir = temp_dir("relink");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let shown = harness.state().studio.selected.expect("an image is shown");
    let path_in_source =
        harness.state().studio.images[shown].path.strip_prefix(dir.join("data")).unwrap().to_path_buf();
    harness.key_press(egui::Key::D);
    harness.run_steps(2);
    wait_until_idle(&mut harness, "the autosave");
    drop(harness);

    std::fs::rename(dir.join("data"), dir.join("tiles-2026")).unwrap();
    let mut reopened = self::harness(project.clone(), Some(View::Gallery));
    wait_until_idle(&mut reopened, "the failed import");
    assert!(reopened.state().studio.images.is_empty());
    assert!(
        reopened.state().messages().iter().any(|m| m.contains("cannot import data")),
        "{:?}",
        reopened.state().messages()
    );

    reopened.get_by_label("Relink…").click();
    reopened.run_steps(2);
    // The field has the keyboard as soon as it opens.
    assert!(reopened.get_by_role(accesskit::Role::TextInput).is_focused());
    reopened.get_by_role(accesskit::Role::TextInput).type_text(&dir.join("tiles-2026").display().to_string());
    reopened.run_steps(2);
    reopened.get_by_label("Apply").click();
    reopened.run_steps(2);
    wait_until_idle(&mut reopened, "the import after relinking");
    assert_eq!(
        reopened.state().studio.images.len(),
        24 + 8 + 3 * 4,
        "the images are back; {:?}",
        reopened.state().messages()
    );
    let key = format!("tiles-2026/{}", path_in_source.display());
    let studio = &reopened.state().studio;
    let index = studio.images.iter().position(|i| i.label_key == key).expect("the image under its new key");
    assert_eq!(studio.label_of(index).and_then(|l| l.verdict), Some(Verdict::Defect), "the label followed");
    let saved = Project::load(&project).unwrap();
    assert_eq!(saved.sources, [Source::Benchmark("tiles-2026".into())]);
    assert!(saved.labels.contains_key(&key));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Labels menu's labelme import (the job behind the dialog): the labels join the project, the masks show in
/// the inspector, and the export writes them back out in MVTec layout.
#[test]
fn labelme_files_imported_in_the_studio_show_their_masks() {
    use loupe_engine::labels::Verdict;
    let dir = temp_dir("labelme-studio");
    let project = tiny_project(&dir);
    let good = dir.join("data/test/good");
    let image = std::fs::read_dir(&good).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let name = image.file_name().unwrap().to_str().unwrap().to_string();
    let annotations = dir.join("annotations");
    std::fs::create_dir_all(&annotations).unwrap();
    let json = format!(
        r#"{{"version": "5.4.1", "flags": {{}}, "imagePath": "../data/test/good/{name}", "imageData": null,
            "imageWidth": 96, "imageHeight": 96,
            "shapes": [{{"label": "stain", "points": [[20, 20], [50, 44]], "shape_type": "rectangle"}}]}}"#
    );
    std::fs::write(annotations.join("a.json"), json).unwrap();
    std::fs::write(annotations.join("b.json"), "{ not json").unwrap();
    let mut harness = harness(project.clone(), Some(View::Inspector));
    wait_until_idle(&mut harness, "the import");
    let ctx = harness.ctx.clone();
    harness.state_mut().start_labelme_import(&ctx, annotations);
    wait_until_idle(&mut harness, "the labelme import");
    let messages = harness.state().messages();
    assert!(messages.iter().any(|m| m.contains("imported 1 labelme files")), "{messages:?}");
    let index = harness.state().studio.images.iter().position(|i| i.path == image).unwrap();
    let label = harness.state().studio.label_of(index).cloned().unwrap();
    assert_eq!(
        (label.verdict, label.defect_types.as_slice()),
        (Some(Verdict::Defect), ["stain".to_string()].as_slice())
    );
    assert!(harness.state().studio.project.defect_types.contains(&"stain".to_string()));
    let mask = mask_in_studio(&mut harness, index);
    assert_eq!(mask.defect_pixels(), 30 * 24, "the rectangle's pixels");
    assert!(mask.get(20, 20) && mask.get(49, 43) && !mask.get(50, 44));

    let out = dir.join("exported");
    harness.state_mut().start_labels_export(&ctx, out.clone());
    wait_until_idle(&mut harness, "the export");
    let exported_mask =
        out.join("ground_truth/stain").join(format!("{}_mask.png", image.file_stem().unwrap().to_str().unwrap()));
    assert!(exported_mask.is_file(), "{}", exported_mask.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A folder dropped on the window, as the windowing layer hands it over.
#[derive(Debug)]
struct DroppedFolder(PathBuf);

impl egui::DroppedFile for DroppedFolder {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        Err("a folder has no bytes".into())
    }
}

/// A folder without usable images is refused when it is added (dropped on the window), with a message naming
/// it; the project keeps its sources and its images.
#[test]
fn an_empty_folder_is_refused_with_a_message_and_the_project_keeps_its_images() {
    let dir = temp_dir("empty-folder");
    let project = tiny_project(&dir);
    let empty = dir.join("no-parts-yet");
    std::fs::create_dir_all(&empty).unwrap();
    let mut harness = harness(project.clone(), Some(View::Gallery));
    wait_until_idle(&mut harness, "the import");
    harness.input_mut().dropped_files.push(std::sync::Arc::new(DroppedFolder(empty.clone())));
    harness.run_steps(2);
    wait_until_idle(&mut harness, "after the refusal");
    let messages = harness.state().messages();
    let message = messages.iter().find(|m| m.contains("was not added")).unwrap_or_else(|| panic!("{messages:?}"));
    assert!(message.contains("no-parts-yet") && message.contains("no images"), "names folder and reason: {message}");
    assert_eq!(harness.state().studio.project.sources, [Source::Benchmark("data".into())]);
    assert_eq!(harness.state().studio.images.len(), 24 + 8 + 3 * 4, "the images stay");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The decision threshold travels with the model file only when a write succeeded: a refused write is retried;
/// opening the threshold view of a model without a threshold chooses none; a threshold `loupe eval
/// --save-threshold` wrote into the file is adopted on reopening, not overwritten.
#[test]
fn thresholds_reach_the_model_file_only_when_chosen_and_are_never_overwritten_silently() {
    use loupe_engine::model_file::{self, ChosenBy};
    let dir = temp_dir("threshold-file");
    let (project, mut harness) = trained_tiny_project(&dir);
    let file = dir.join(&harness.state().studio.project.models[0].file);
    let manifest_decision = || model_file::read_manifest(&file).unwrap().thresholds.decision;
    let fitted = manifest_decision().expect("fit chose a threshold");

    // A refused model-file write: the project is saved, the model file keeps its threshold, and once writes are
    // possible again the new threshold gets there without another change.
    loupe_engine::atomic_file::refuse_writes_in(&dir.join("models"), true);
    let chosen = fitted * 1.5 + 0.25;
    harness.state_mut().studio.project.models[0].decision = Some(chosen);
    harness.state_mut().studio.changed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !harness.state().messages().iter().any(|m| m.contains("could not save")) {
        assert!(Instant::now() < deadline, "no message; messages: {:?}", harness.state().messages());
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(manifest_decision(), Some(fitted));
    loupe_engine::atomic_file::refuse_writes_in(&dir.join("models"), false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while manifest_decision() != Some(chosen) {
        assert!(Instant::now() < deadline, "the failed threshold write was never retried");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }

    // No threshold: the view shows a proposal and writes nothing.
    harness.state_mut().studio.project.models[0].decision = None;
    harness.state_mut().studio.changed();
    wait_until_idle(&mut harness, "the autosave");
    harness.get_by_label("Threshold").click();
    harness.run_steps(6);
    harness.get_by_label_contains("the one shown is a proposal");
    wait_until_idle(&mut harness, "the autosave");
    assert_eq!(harness.state().studio.project.models[0].decision, None);
    assert_eq!(Project::load(&project).unwrap().models[0].decision, None);
    assert_eq!(manifest_decision(), None);
    drop(harness);

    // `eval --save-threshold` writes the file while the studio is closed: reopening adopts it and says so.
    let backbone = std::sync::Arc::new(
        loupe_engine::backbone::Backbone::load(
            &loupe_engine::backbone::weights::default_weights_path(),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let mut loaded = model_file::load(&file, backbone).unwrap();
    loaded.manifest.thresholds.decision = Some(fitted * 2.0);
    loaded.manifest.thresholds.chosen_by = ChosenBy::Command;
    loaded.manifest.thresholds.rule = "f1-max on the labelled test set".into();
    model_file::save(&file, loaded.model.as_ref(), &loaded.manifest).unwrap();
    let mut reopened = self::harness(project.clone(), Some(View::Threshold));
    wait_until_idle(&mut reopened, "reopening");
    assert!(reopened.state().messages().iter().any(|m| m.contains("set outside the studio")));
    assert_eq!(reopened.state().studio.project.models[0].decision, Some(fitted * 2.0));
    wait_until_idle(&mut reopened, "the autosave");
    assert_eq!(manifest_decision(), Some(fitted * 2.0), "the file's threshold is kept");
    assert_eq!(Project::load(&project).unwrap().models[0].decision, Some(fitted * 2.0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Model ▸ Export the active model as ONNX (and as a bundle, and Project ▸ Export report) writes the file with the
/// thresholds the project holds at that moment (a threshold dragged a moment ago, not the one the model file had).
#[test]
fn the_active_model_exports_to_onnx_with_the_thresholds_of_the_moment() {
    let dir = temp_dir("onnx-export");
    let (_, mut harness) = trained_tiny_project(&dir);
    let chosen = 1.25 * harness.state().studio.project.models[0].decision.expect("fit chose a threshold");
    harness.state_mut().studio.project.models[0].decision = Some(chosen);
    harness.state_mut().studio.changed();
    let out = dir.join("line.onnx");
    let ctx = harness.ctx.clone();
    harness.state_mut().start_onnx_export(&ctx, out.clone());
    wait_until_idle(&mut harness, "the export");
    let metadata: std::collections::HashMap<String, String> =
        loupe_engine::onnx::read_metadata(&out).unwrap().into_iter().collect();
    assert_eq!(metadata["loupe.method"], "patchcore");
    assert_eq!(metadata["loupe.decision_threshold"], chosen.to_string());
    assert!(harness.state().messages().iter().any(|m| m.contains("line.onnx")), "{:?}", harness.state().messages());

    let bundle = dir.join("line.bundle.safetensors");
    harness.state_mut().start_bundle_export(&ctx, bundle.clone());
    wait_until_idle(&mut harness, "the bundle export");
    let manifest = loupe_engine::model_file::read_manifest(&bundle).unwrap();
    assert!(manifest.backbone_embedded);
    assert_eq!(manifest.thresholds.decision, Some(chosen));

    // Project ▸ Export report: the report states the threshold of the moment and where it came from.
    let report = dir.join("line report.html");
    harness.state_mut().start_report_export(&ctx, report.clone());
    wait_until_idle(&mut harness, "the report");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains(&format!("{chosen:.4}")) && html.contains("set in Loupe&#39;s threshold panel"), "{html}");
    assert!(html.matches("data:image/jpeg;base64,").count() >= 2, "image + heatmap pairs are embedded");
    let _ = std::fs::remove_dir_all(&dir);
}

/// F5 presents: the menus give way to the part, its heatmap and the verdict, FAR and MAR in large type; ←/→ walk
/// the playlist; an image pinned in the inspector is in the pinned playlist (and in the saved project); a second
/// model is loaded and shown beside the first; Esc returns to the studio.
#[test]
fn presentation_mode_walks_playlists_and_compares_two_models() {
    use loupe::studio::views::present::{playlist_images, Playlist};
    let dir = temp_dir("present");
    let project = tiny_project(&dir);
    let mut harness = harness(project.clone(), Some(View::Train));
    wait_until_idle(&mut harness, "the import");
    for method in
        [&loupe_engine::methods::representation::patchcore::INFO, &loupe_engine::methods::representation::padim::INFO]
    {
        harness.state_mut().studio.project.training.method = method.name.into();
        if method.name == "padim" {
            harness.state_mut().studio.project.training.settings_json = "{}".into();
        }
        harness.run_steps(2);
        harness.get_by_label(&format!("Train {}", method.title)).click();
        harness.run_steps(2);
        wait_until_idle(&mut harness, "training");
    }
    assert_eq!(harness.state().studio.project.models.len(), 2, "{:?}", harness.state().messages());
    assert_eq!(harness.state().studio.project.active_model, Some(1), "the last trained model is active");

    // Pin the first defective test image in the inspector.
    let defective = harness.state().studio.images.iter().position(|i| i.label.is_anomalous()).unwrap();
    harness.state_mut().studio.selected = Some(defective);
    harness.state_mut().studio.project.pinned.clear();
    let ctx = harness.ctx.clone();
    harness.state_mut().present(&ctx, false);
    harness.get_by_label("Inspector").click();
    harness.run_steps(2);
    harness.get_by_label("Pin for presenting").click();
    harness.run_steps(2);
    let pinned_key = harness.state().studio.images[defective].label_key.clone();
    assert_eq!(harness.state().studio.project.pinned, std::slice::from_ref(&pinned_key));

    harness.key_press(egui::Key::F5);
    harness.run_steps(3);
    assert!(harness.state().is_presenting());
    assert!(harness.query_by_label("Project").is_none(), "menus are hidden while presenting");
    harness.get_by_label("FAR: good parts rejected");
    harness.get_by_label("MAR: defects passed");
    let studio = &harness.state().studio;
    assert_eq!(playlist_images(studio, &Playlist::Pinned), [defective]);
    let scratches = playlist_images(studio, &Playlist::DefectType("scratch".into()));
    assert_eq!(scratches.len(), 4, "every scratch test image");
    let scores: Vec<f32> = scratches.iter().map(|&i| studio.score_of(&studio.images[i]).unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "highest score first: {scores:?}");
    let decision = studio.thresholds().unwrap().0;
    for &i in &playlist_images(studio, &Playlist::WorstFalseAlarms) {
        assert!(!studio.images[i].label.is_anomalous() && studio.score_of(&studio.images[i]).unwrap() >= decision);
    }

    harness.state_mut().presentation().playlist = Playlist::DefectType("scratch".into());
    harness.state_mut().presentation().position = 0;
    harness.run_steps(2);
    harness.key_press(egui::Key::ArrowRight);
    harness.run_steps(2);
    assert_eq!(harness.state_mut().presentation().position, 1);
    harness.get_by_label("2 of 4");

    // Side by side: the other model is loaded on demand and named over its heatmap.
    harness.state_mut().presentation().compare_with = Some(0);
    harness.run_steps(2);
    wait_until_idle(&mut harness, "loading the second model");
    harness.run_steps(3);
    assert!(harness.state().studio.runtimes[0].model.is_some(), "the compared model was loaded");
    let first_name = harness.state().studio.project.models[0].name.clone();
    harness.get_by_label(&first_name);
    assert_eq!(harness.query_all_by_label("FAR: good parts rejected").count(), 2, "each model's figures");

    harness.key_press(egui::Key::Escape);
    harness.run_steps(2);
    assert!(!harness.state().is_presenting());
    harness.get_by_label("Project");
    wait_until_idle(&mut harness, "the autosave");
    assert_eq!(Project::load(&project).unwrap().pinned, [pinned_key], "pins are saved with the project");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reopening a project does not score again what did not change: the evaluation and its heatmaps come from
/// the cache beside the model file while the weights, images and labels are those it was computed from; a
/// touched image or a corrupt cache means scoring again (and the same results).
#[test]
fn reopening_reuses_the_heatmaps_of_an_unchanged_model() {
    let dir = temp_dir("map-cache");
    let (project, harness) = trained_tiny_project(&dir);
    let model = dir.join(&harness.state().studio.project.models[0].file);
    let cache = model.with_extension("maps.safetensors");
    assert!(cache.is_file(), "training keeps its heatmaps for the next opening");
    let maps_of = |harness: &Harness<'_, StudioApp>| {
        // Keyed by path: ids are given out per session, so two openings may number the images differently.
        let studio = &harness.state().studio;
        let runtime = studio.active_runtime().unwrap();
        let path_of =
            |id: &ImageId| studio.images.iter().find(|i| i.id == *id).map(|i| reported_path(&i.path)).unwrap();
        let mut maps: Vec<(String, Vec<f32>)> =
            runtime.maps.iter().map(|(k, m)| (path_of(k), m.data.clone())).collect();
        maps.sort_by(|a, b| a.0.cmp(&b.0));
        maps
    };
    let trained = maps_of(&harness);
    drop(harness);

    let written = std::fs::metadata(&cache).unwrap().modified().unwrap();
    let mut reopened = self::harness(project.clone(), None);
    wait_until_idle(&mut reopened, "reopening");
    assert_eq!(maps_of(&reopened), trained, "the same heatmaps");
    assert_eq!(std::fs::metadata(&cache).unwrap().modified().unwrap(), written, "read, not recomputed");
    drop(reopened);

    // A changed image invalidates the cache: scored again, the same maps, the cache rewritten.
    let image = reopened_image(&dir);
    let bytes = std::fs::read(&image).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&image, bytes).unwrap();
    let mut rescored = self::harness(project.clone(), None);
    wait_until_idle(&mut rescored, "reopening after a change");
    assert_eq!(maps_of(&rescored), trained);
    assert_ne!(std::fs::metadata(&cache).unwrap().modified().unwrap(), written, "recomputed and kept again");
    drop(rescored);

    // A corrupt cache is a miss, not an error.
    std::fs::write(&cache, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a cache").unwrap();
    let mut recovered = self::harness(project, None);
    wait_until_idle(&mut recovered, "reopening with a corrupt cache");
    assert!(recovered.state().messages().is_empty(), "{:?}", recovered.state().messages());
    assert_eq!(maps_of(&recovered), trained);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One test image of the tiny project.
fn reopened_image(dir: &Path) -> PathBuf {
    dir.join("data/test/good").read_dir().unwrap().next().unwrap().unwrap().path()
}
