//! The report's plots as SVG text (plotters' SVG backend): the ROC curve and the FAR-vs-MAR trade-off with the
//! operating point marked, and the score histograms of good and defective images with the thresholds drawn.

use anyhow::{anyhow, Result};
use loupe_engine::metrics::RocCurve;
use plotters::prelude::*;

const WIDTH: u32 = 440;
const HEIGHT: u32 = 330;
const GOOD: RGBColor = RGBColor(46, 125, 50);
const DEFECT: RGBColor = RGBColor(198, 40, 40);
const CURVE: RGBColor = RGBColor(21, 101, 192);
const REVIEW: RGBColor = RGBColor(239, 108, 0);

fn svg(draw: impl FnOnce(DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()>) -> Result<String> {
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(root.clone())?;
        root.present().map_err(plot_error)?;
    }
    Ok(text)
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {error}")
}

/// A curve through `points` on the unit square, the operating point marked and labelled.
fn unit_square_curve(
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    points: Vec<(f64, f64)>,
    operating: Option<(f64, f64)>,
    diagonal: bool,
) -> Result<String> {
    svg(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(plot_error)?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).light_line_style(WHITE).draw().map_err(plot_error)?;
        if diagonal {
            chart
                .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.25)))
                .map_err(plot_error)?
                .label("chance")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.25)));
        }
        chart
            .draw_series(LineSeries::new(points, CURVE.stroke_width(2)))
            .map_err(plot_error)?
            .label("this model")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], CURVE.stroke_width(2)));
        if let Some(point) = operating {
            chart
                .draw_series([Circle::new(point, 6, DEFECT.filled())])
                .map_err(plot_error)?
                .label("decision threshold")
                .legend(|(x, y)| Circle::new((x + 8, y), 5, DEFECT.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_error)?;
        Ok(())
    })
}

/// ROC: true-positive rate (defects caught) against false-positive rate (FAR).
pub fn roc(curve: &RocCurve, operating: Option<(f64, f64)>, auroc: f64) -> Result<String> {
    let points = curve.fpr.iter().copied().zip(curve.tpr.iter().copied()).collect();
    let caption = format!("ROC curve (AUROC {auroc:.3})");
    unit_square_curve(&caption, ("FAR: good parts rejected", "defects caught"), points, operating, true)
}

/// The trade-off a threshold makes: MAR (defects passed) against FAR (good parts rejected).
pub fn far_vs_mar(curve: &RocCurve, operating: Option<(f64, f64)>) -> Result<String> {
    let points = curve.fpr.iter().zip(&curve.tpr).map(|(&far, &tpr)| (far, 1.0 - tpr)).collect();
    let caption = "False alarms against missed defects";
    unit_square_curve(caption, ("FAR: good parts rejected", "MAR: defects passed"), points, operating, false)
}

/// Counts of `scores` in `bins` equal bins over [low, high].
fn bin_counts(scores: &[f32], (low, high): (f64, f64), bins: usize) -> Vec<u32> {
    let mut counts = vec![0u32; bins];
    let width = (high - low) / bins as f64;
    for &score in scores {
        let bin = ((score as f64 - low) / width).floor().clamp(0.0, (bins - 1) as f64) as usize;
        counts[bin] += 1;
    }
    counts
}

/// Score histograms of the good and the defective test images, the decision (and review) threshold as lines.
pub fn histogram(good: &[f32], defective: &[f32], decision: Option<f32>, review: Option<f32>) -> Result<String> {
    const BINS: usize = 40;
    let all = good.iter().chain(defective).chain(decision.iter()).chain(review.iter()).copied();
    let (min, max) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| (lo.min(s as f64), hi.max(s as f64)));
    let (low, high) = if min < max { (min, max + (max - min) * 1e-6) } else { (min - 0.5, min + 0.5) };
    let good_counts = bin_counts(good, (low, high), BINS);
    let defect_counts = bin_counts(defective, (low, high), BINS);
    let top = good_counts.iter().chain(&defect_counts).copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let width = (high - low) / BINS as f64;
    svg(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Scores of the test images", ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(48)
            .build_cartesian_2d(low..high, 0f64..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("anomaly score")
            .y_desc("images")
            .light_line_style(WHITE)
            .draw()
            .map_err(plot_error)?;
        for (counts, color, label) in [(&good_counts, GOOD, "good"), (&defect_counts, DEFECT, "defective")] {
            let bars = counts.iter().enumerate().filter(|(_, &c)| c > 0).map(move |(i, &c)| {
                let x0 = low + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], color.mix(0.45).filled())
            });
            chart
                .draw_series(bars)
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.45).filled()));
        }
        for (threshold, color, label) in [(decision, DEFECT, "decision threshold"), (review, REVIEW, "review from")] {
            let Some(t) = threshold else { continue };
            chart
                .draw_series(LineSeries::new([(t as f64, 0.0), (t as f64, top)], color.stroke_width(2)))
                .map_err(plot_error)?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_error)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_engine::metrics::roc_curve;

    #[test]
    fn plots_are_svg_with_their_marks() {
        let scores = [0.1, 0.2, 0.3, 0.8, 0.9, 0.35];
        let labels = [false, false, false, true, true, true];
        let curve = roc_curve(&scores, &labels).unwrap();
        let roc = roc(&curve, Some((0.0, 2.0 / 3.0)), 1.0).unwrap();
        assert!(roc.starts_with("<svg") && roc.contains("<circle"), "{roc}");
        let histogram = histogram(&scores[..3], &scores[3..], Some(0.5), Some(0.32)).unwrap();
        assert!(histogram.contains("decision threshold") && histogram.contains("review from"));
        assert_eq!(bin_counts(&[0.0, 0.49, 0.5, 1.0], (0.0, 1.0), 2), vec![2, 2]);
    }
}
