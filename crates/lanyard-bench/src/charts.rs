//! PNG charts with plotters' bitmap backend. Text needs a TrueType font, read at run time
//! (no fontconfig): `LANYARD_BENCH_FONT` or the usual DejaVu/Liberation paths. Without one
//! the charts are skipped and the report says so.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{Chart, ChartKind};

const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for chart text; returns where it came from, or `None` if none was found.
pub(crate) fn load_font() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("LANYARD_BENCH_FONT") {
        candidates.push(path.into());
    }
    candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
            return Some(path);
        }
    }
    None
}

/// Draws `chart` to `dir/<name>.png`.
pub(crate) fn draw(chart: &Chart, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{}.png", chart.name));
    draw_to(chart, &path)?;
    Ok(path)
}

fn draw_to(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let n = chart.categories.len().max(1);
    let y_max = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let (x_min, x_max) = match chart.kind {
        ChartKind::Bar => (0.0, n as f64),
        ChartKind::Line => (-0.5, n as f64 - 0.5),
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, (FONT_FAMILY, 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let mut plot = builder
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    plot.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|y| crate::report::format_value(*y))
        .y_desc(chart.y_label.as_str())
        .label_style((FONT_FAMILY, 14))
        .draw()
        .map_err(plot_error)?;

    let m = chart.series.len().max(1);
    for (j, series) in chart.series.iter().enumerate() {
        let color = Palette99::pick(j).to_rgba();
        match chart.kind {
            ChartKind::Bar => {
                let width = 0.8 / m as f64;
                plot.draw_series(series.values.iter().enumerate().map(|(i, &v)| {
                    let left = i as f64 + 0.1 + j as f64 * width;
                    Rectangle::new([(left, 0.0), (left + width * 0.95, v)], color.filled())
                }))
                .map_err(plot_error)?
                .label(series.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            }
            ChartKind::Line => {
                let points: Vec<(f64, f64)> = series
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as f64, v))
                    .collect();
                plot.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(series.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                plot.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(plot_error)?;
            }
        }
    }
    plot.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT_FAMILY, 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;

    // Category labels under the axis, centred on each category.
    let label_style =
        TextStyle::from((FONT_FAMILY, 15).into_font()).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ));
    for (i, category) in chart.categories.iter().enumerate() {
        let x = match chart.kind {
            ChartKind::Bar => i as f64 + 0.5,
            ChartKind::Line => i as f64,
        };
        let (px, py) = plot.backend_coord(&(x, 0.0));
        root.draw(&Text::new(
            category.clone(),
            (px, py + 8),
            label_style.clone(),
        ))
        .map_err(plot_error)?;
    }
    let (px, py) = plot.backend_coord(&((x_min + x_max) / 2.0, 0.0));
    root.draw(&Text::new(
        chart.x_label.clone(),
        (px, py + 28),
        label_style,
    ))
    .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Series;

    #[test]
    fn draws_both_kinds_when_a_font_is_present() {
        if load_font().is_none() {
            // Charts are optional output; the report notes their absence.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for kind in [ChartKind::Bar, ChartKind::Line] {
            let chart = Chart {
                name: format!("{kind:?}"),
                title: "test".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                kind,
                categories: vec!["1".into(), "10".into()],
                series: vec![
                    Series {
                        name: "a".into(),
                        values: vec![1.0, 2.0],
                    },
                    Series {
                        name: "b".into(),
                        values: vec![3.0, 0.5],
                    },
                ],
            };
            let path = draw(&chart, dir.path()).unwrap();
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(&bytes[..4], b"\x89PNG");
        }
    }
}
