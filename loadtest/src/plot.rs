//! The report's plot: throughput and p50/p95/p99 latency against the load level, as SVG.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::Report;
use crate::runner::Load;

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One panel: a titled chart from 0 to `x_max` and `y_max`, with its axes drawn.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    y_max: f64,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    Ok(chart)
}

/// Draws `report` into an SVG file at `path` (two panels side by side).
pub fn svg(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let (left, right) = root.split_horizontally(500);
    let x_label = match report.levels.first().map(|l| l.load) {
        Some(Load::Open { .. }) => "offered load (requests/s)",
        _ => "concurrent clients",
    };
    let xs: Vec<f64> = report.levels.iter().map(|l| l.load.level()).collect();
    let x_max = xs.iter().cloned().fold(1.0, f64::max) * 1.05;

    let throughput: Vec<(f64, f64)> = report.levels.iter().map(|l| (l.load.level(), l.tokens_per_s)).collect();
    let y_max = throughput.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = panel(&left, "throughput", x_label, "generated tokens/s", x_max, y_max)?;
    chart
        .draw_series(LineSeries::new(throughput.clone(), BLUE.stroke_width(2)))
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .draw_series(throughput.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| anyhow!("plot: {e}"))?;

    type Pick = fn(&crate::stats::Percentiles) -> f64;
    let lines: [(&str, RGBColor, Pick); 3] = [
        ("p50", GREEN, |p| p.p50),
        ("p95", RGBColor(230, 140, 0), |p| p.p95),
        ("p99", RED, |p| p.p99),
    ];
    let y_max = report
        .levels
        .iter()
        .filter_map(|l| l.latency_ms.map(|p| p.p99))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = panel(&right, "latency", x_label, "ms", x_max, y_max)?;
    for (name, color, pick) in lines {
        let points: Vec<(f64, f64)> = report
            .levels
            .iter()
            .filter_map(|l| l.latency_ms.map(|p| (l.load.level(), pick(&p))))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
