//! The report laid out as one HTML page with its style inline: readable on screen, paginated when printed
//! (Print ▸ Save as PDF in any browser gives the PDF: see ARCHITECTURE.md "The report").

use super::{ComparisonRow, EvaluationSection, Example, Report};
use std::fmt::Write as _;

const STYLE: &str = "
body { font-family: 'DejaVu Sans', 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d2330; margin: 0 auto;
       max-width: 1100px; padding: 24px 32px; line-height: 1.4; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #1565c0; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #5b6475; margin-top: 0; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #cfd5e0; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f8; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.facts th { width: 220px; } code { word-break: break-all; font-size: 90%; }
.kpis { display: flex; gap: 16px; flex-wrap: wrap; margin: 12px 0; }
.kpi { border: 1px solid #cfd5e0; border-radius: 8px; padding: 10px 18px; min-width: 180px; }
.kpi .value { font-size: 30px; font-weight: bold; } .kpi .what { color: #5b6475; font-size: 14px; }
.far .value { color: #c62828; } .mar .value { color: #ef6c00; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; } .plots svg { max-width: 100%; height: auto; }
.examples { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; border: 1px solid #cfd5e0; border-radius: 6px; padding: 6px; break-inside: avoid; }
figure img { width: 200px; height: auto; display: inline-block; }
figcaption { font-size: 13px; color: #3b4250; max-width: 410px; word-break: break-all; }
.none { color: #5b6475; font-style: italic; }
footer { margin-top: 40px; color: #5b6475; font-size: 13px; }
@media print { body { padding: 0; max-width: none; } nav { display: none; }
  section { break-before: page; } section:first-of-type { break-before: auto; }
  .plots, table, .kpis { break-inside: avoid; } }
";

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or("—".into(), |r| format!("{:.1} %", r * 100.0))
}

fn metric(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.3}"))
}

pub fn render(report: &Report) -> String {
    let mut page = String::new();
    let title = format!("{} — {}", report.project_name, report.model.name);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Loupe report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    let _ = write!(
        page,
        "<header><h1>Anomaly detection report: {}</h1>\n<p class=\"sub\">Project {} · written {} by Loupe {}</p>\n",
        escape(&report.model.name),
        escape(&report.project_name),
        escape(&report.written_at),
        env!("CARGO_PKG_VERSION")
    );
    page.push_str("<nav><a href=\"#model\">Model</a><a href=\"#decision\">Decision</a>");
    for (i, section) in report.sections.iter().enumerate() {
        let _ = write!(page, "<a href=\"#test-{i}\">Test set {}</a>", escape(&section.category));
    }
    if !report.comparison.is_empty() {
        page.push_str("<a href=\"#comparison\">Model comparison</a>");
    }
    page.push_str("</nav></header>\n");
    model_section(&mut page, report);
    decision_section(&mut page, report);
    for (i, section) in report.sections.iter().enumerate() {
        evaluation_section(&mut page, i, section, report.thresholds.review.is_some());
    }
    if !report.comparison.is_empty() {
        comparison_section(&mut page, &report.comparison);
    }
    page.push_str(
        "<footer>FAR (false-alarm rate): share of good parts the threshold rejects. MAR (missed-alarm rate): share \
         of defective parts it passes. Heatmaps are coloured relative to the decision threshold: the middle of the \
         colour scale (green) is the threshold, red is far above it. Printing this page (Print ▸ Save as PDF) gives \
         one section per page.</footer>\n</body>\n</html>\n",
    );
    page
}

fn facts_row(page: &mut String, name: &str, value: &str) {
    let _ = writeln!(page, "<tr><th>{}</th><td>{value}</td></tr>", escape(name));
}

fn model_section(page: &mut String, report: &Report) {
    let m = &report.model;
    page.push_str("<section id=\"model\"><h2>What was trained on what</h2>\n<table class=\"facts\">\n");
    facts_row(page, "Method", &format!("{} — {} family", escape(&m.method), escape(&m.family)));
    facts_row(page, "What it does", &escape(&m.summary));
    facts_row(page, "Trained on", &escape(&m.training_source));
    facts_row(
        page,
        "Training images",
        &format!("{} used, {} skipped (unreadable) · fit in {:.1} s", m.images_used, m.images_skipped, m.fit_seconds),
    );
    facts_row(page, "Input size", &format!("{0} × {0} pixels", m.image_size));
    facts_row(page, "Settings", &format!("<code>{}</code>", escape(&m.settings)));
    facts_row(page, "Model file", &format!("{} · written {}", escape(&m.file_name), escape(&m.file_date)));
    facts_row(page, "Model SHA-256", &format!("<code>{}</code>", escape(&m.sha256)));
    facts_row(page, "Trained with", &format!("Loupe {}", escape(&m.trained_with)));
    page.push_str("</table></section>\n");
}

fn decision_section(page: &mut String, report: &Report) {
    let t = &report.thresholds;
    page.push_str("<section id=\"decision\"><h2>The decision</h2>\n<table class=\"facts\">\n");
    let number = |v: Option<f32>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    facts_row(page, "Decision threshold (reject at or above)", &number(t.decision));
    facts_row(page, "Review from (a person decides)", &number(t.review));
    facts_row(page, "How it was chosen", &escape(&t.rule));
    page.push_str("</table>\n<div class=\"kpis\">\n");
    for section in &report.sections {
        let c = &section.confusion;
        let caption = escape(&section.category);
        let _ = write!(
            page,
            "<div class=\"kpi far\"><div class=\"value\">{}</div><div class=\"what\">FAR on {caption}: {} of {} good \
             parts rejected</div></div>\n<div class=\"kpi mar\"><div class=\"value\">{}</div><div class=\"what\">MAR \
             on {caption}: {} of {} defects passed</div></div>\n",
            percent(c.far()),
            c.false_positive,
            section.good,
            percent(c.mar()),
            c.false_negative,
            section.defective
        );
    }
    page.push_str("</div></section>\n");
}

fn evaluation_section(page: &mut String, index: usize, section: &EvaluationSection, has_review: bool) {
    let r = &section.report;
    let _ = write!(
        page,
        "<section id=\"test-{index}\"><h2>Test set {}</h2>\n<p>{} test images: {} good, {} defective{}. Image AUROC \
         <b>{:.3}</b>, pixel AUROC {}, AUPRO@0.3 {}, best F1 {:.3}; scoring ran at {:.1} images/s.</p>\n",
        escape(&section.category),
        r.test_images,
        section.good,
        section.defective,
        if r.skipped.is_empty() { String::new() } else { format!(", {} unreadable and skipped", r.skipped.len()) },
        r.image_auroc,
        metric(r.pixel_auroc),
        metric(r.aupro),
        r.f1_max,
        r.test_images_per_s
    );
    let at = if section.at_decision {
        format!("the decision threshold {:.4}", section.shown_at)
    } else {
        format!("the best-F1 threshold {:.4} (no decision threshold was chosen)", section.shown_at)
    };
    let c = &section.confusion;
    let _ = write!(
        page,
        "<h3>At {at}</h3>\n<table><tr><th></th><th>rejected</th><th>passed</th></tr>\n\
         <tr><th>defective ({})</th><td class=\"num\">{} (caught)</td><td class=\"num\">{} (missed: MAR {})</td></tr>\n\
         <tr><th>good ({})</th><td class=\"num\">{} (false alarms: FAR {})</td><td class=\"num\">{}</td></tr></table>\n",
        section.defective,
        c.true_positive,
        c.false_negative,
        percent(c.mar()),
        section.good,
        c.false_positive,
        percent(c.far()),
        c.true_negative
    );
    if let (Some(bands), true) = (section.bands, has_review) {
        let _ = writeln!(
            page,
            "<p>With the review band: {} passed, {} sent to a person, {} rejected.</p>",
            bands.pass, bands.review, bands.reject
        );
    }
    let _ = writeln!(
        page,
        "<div class=\"plots\">{}{}{}</div>",
        section.roc_svg, section.trade_off_svg, section.histogram_svg
    );
    page.push_str(
        "<h3>Per defect type</h3>\n<table><tr><th>type</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th>\
         <th>AUPRO</th><th>flagged</th></tr>\n",
    );
    for (name, t) in &r.per_defect_type {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{:.1} %</td></tr>",
            escape(name),
            t.images,
            metric(t.image_auroc),
            metric(t.pixel_auroc),
            metric(t.aupro),
            t.detected * 100.0
        );
    }
    page.push_str("</table>\n");
    examples(page, "Worst missed defects (lowest-scoring defects passed)", &section.misses, "no defect is missed");
    examples(page, "Worst false alarms (highest-scoring good parts rejected)", &section.false_alarms, "no false alarm");
    examples(page, "Defects caught (highest-scoring)", &section.caught, "no defect is caught");
    page.push_str("</section>\n");
}

fn examples(page: &mut String, title: &str, examples: &[Example], none: &str) {
    let _ = writeln!(page, "<h3>{}</h3>", escape(title));
    if examples.is_empty() {
        let _ = writeln!(page, "<p class=\"none\">At this threshold {none}.</p>");
        return;
    }
    page.push_str("<div class=\"examples\">\n");
    for example in examples {
        let caption = format!("{} · {} · score {:.4}", example.file, example.defect_type, example.score);
        match &example.pictures {
            Ok((image, heatmap)) => {
                let _ = writeln!(
                    page,
                    "<figure><img alt=\"image {0}\" src=\"data:image/jpeg;base64,{image}\">\
                     <img alt=\"heatmap {0}\" src=\"data:image/jpeg;base64,{heatmap}\">\
                     <figcaption>{0}</figcaption></figure>",
                    escape(&caption)
                );
            }
            Err(why) => {
                let _ = writeln!(
                    page,
                    "<figure><figcaption>{}: not shown ({})</figcaption></figure>",
                    escape(&caption),
                    escape(why)
                );
            }
        }
    }
    page.push_str("</div>\n");
}

fn comparison_section(page: &mut String, rows: &[ComparisonRow]) {
    page.push_str(
        "<section id=\"comparison\"><h2>Model comparison</h2>\n<table><tr><th>model</th><th>method</th><th>family</th>\
         <th>test set</th><th>image AUROC</th><th>pixel AUROC</th><th>AUPRO</th><th>threshold</th><th>FAR</th>\
         <th>MAR</th><th>fit</th><th>images/s</th></tr>\n",
    );
    for row in rows {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{:.1} s</td><td class=\"num\">{:.1}</td></tr>",
            escape(&row.model),
            escape(&row.method),
            escape(&row.family),
            escape(&row.category),
            row.image_auroc,
            metric(row.pixel_auroc),
            metric(row.aupro),
            row.threshold.map_or("—".into(), |t| format!("{t:.4}")),
            percent(row.far),
            percent(row.mar),
            row.fit_seconds,
            row.images_per_s
        );
    }
    page.push_str("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;");
    }
}
