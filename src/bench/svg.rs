//! Horizontal bar charts drawn by hand as SVG: one `<rect class="bar">` per
//! bar (its median) and a thin line to its p90, labels on the left, values on
//! the right; reference values (such as published medians) as dashed vertical
//! lines. No other rectangles, so a reader (or a test) can count bars. When
//! the values span more than [`LOG_SCALE_SPAN`] the scale is logarithmic (and
//! the title says so), so a 1 ms bar beside a 1 s bar is still visible.

use std::fmt::Write as _;

/// Pixel sizes of a chart (fixed: the charts are read in a Markdown page).
const WIDTH: f64 = 760.0;
const LABEL_WIDTH: f64 = 270.0;
const VALUE_WIDTH: f64 = 120.0;
const BAR_HEIGHT: f64 = 18.0;
const ROW_GAP: f64 = 8.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 16.0;
/// Height of the band under the bars where reference lines are labelled.
const REFERENCE_BAND: f64 = 16.0;
/// A generous average glyph width at 12 px, to keep labels inside the chart.
const CHAR_WIDTH: f64 = 7.0;
/// Largest over smallest value past which the scale is logarithmic.
pub const LOG_SCALE_SPAN: f64 = 50.0;

/// One bar: a label, its median and its p90 (both in the chart's unit).
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub p90: f64,
}

/// Escapes text for an SVG text node or attribute.
pub fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// A chart of `bars` titled `title`, values in `unit` (such as "ms"), with
/// `references` (label, value) drawn as dashed lines across the bars.
pub fn bar_chart(title: &str, unit: &str, bars: &[Bar], references: &[(String, f64)]) -> String {
    let band = if references.is_empty() { 0.0 } else { REFERENCE_BAND * references.len() as f64 };
    let rows_bottom = TOP + bars.len() as f64 * (BAR_HEIGHT + ROW_GAP);
    let height = rows_bottom + band + BOTTOM;
    let plot = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let values = || bars.iter().flat_map(|b| [b.value, b.p90]).chain(references.iter().map(|(_, v)| *v));
    let largest = values().fold(0.0_f64, f64::max);
    let smallest = values().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let logarithmic = smallest.is_finite() && largest / smallest > LOG_SCALE_SPAN;
    // Pixels from the left edge of the plot for a value.
    let x = |value: f64| -> f64 {
        if largest <= 0.0 {
            0.0
        } else if logarithmic {
            // The smallest value sits at a tenth of the plot, not at zero.
            let floor = smallest / 2.0;
            let span = (largest / floor).ln();
            plot * ((value.max(floor) / floor).ln() / span)
        } else {
            plot * value / largest
        }
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"  <text x="8" y="20" font-size="14" font-weight="bold">{} (median, line to p90; {}{})</text>"#,
        escape(title),
        escape(unit),
        if logarithmic { ", logarithmic scale" } else { "" }
    );
    for (row, bar) in bars.iter().enumerate() {
        let y = TOP + row as f64 * (BAR_HEIGHT + ROW_GAP);
        let width = x(bar.value).max(1.0);
        let whisker = LABEL_WIDTH + x(bar.p90).max(width);
        let middle = y + BAR_HEIGHT / 2.0;
        let _ = writeln!(
            svg,
            r#"  <text x="{:.1}" y="{:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"#,
            LABEL_WIDTH - 6.0,
            middle,
            escape(&bar.label)
        );
        let _ = writeln!(
            svg,
            r##"  <rect class="bar" x="{LABEL_WIDTH:.1}" y="{y:.1}" width="{width:.1}" height="{BAR_HEIGHT:.1}" fill="#4c78a8"><title>{}: {}</title></rect>"##,
            escape(&bar.label),
            format_value(bar.value, unit)
        );
        let _ = writeln!(
            svg,
            r##"  <line x1="{:.1}" y1="{middle:.1}" x2="{whisker:.1}" y2="{middle:.1}" stroke="#222" stroke-width="1"/>"##,
            LABEL_WIDTH + width
        );
        let _ = writeln!(
            svg,
            r#"  <text x="{:.1}" y="{middle:.1}" dominant-baseline="middle">{}</text>"#,
            whisker + 6.0,
            escape(&format_value(bar.value, unit))
        );
    }
    for (index, (label, value)) in references.iter().enumerate() {
        let at = LABEL_WIDTH + x(*value);
        let label_y = rows_bottom + REFERENCE_BAND * (index as f64 + 0.5);
        let _ = writeln!(
            svg,
            r##"  <line class="reference" x1="{at:.1}" y1="{:.1}" x2="{at:.1}" y2="{:.1}" stroke="#c0392b" stroke-width="1" stroke-dasharray="4 3"/>"##,
            TOP - 4.0,
            label_y
        );
        let text = format!("{label} {}", format_value(*value, unit));
        // A label that would run past the right edge is drawn to the line's left.
        let (text_x, anchor) =
            if at + 4.0 + text.len() as f64 * CHAR_WIDTH > WIDTH { (at - 4.0, "end") } else { (at + 4.0, "start") };
        let _ = writeln!(
            svg,
            r##"  <text x="{text_x:.1}" y="{label_y:.1}" text-anchor="{anchor}" fill="#c0392b" dominant-baseline="middle">{}</text>"##,
            escape(&text)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A value with enough digits to read: 0.123, 12.3, 1234.
pub fn format_value(value: f64, unit: &str) -> String {
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else if value >= 1.0 {
        2
    } else {
        3
    };
    format!("{value:.digits$} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rect_per_bar_and_labels_escaped() {
        let bars = vec![
            Bar { label: "a <b> & c".into(), value: 2.0, p90: 3.0 },
            Bar { label: "d".into(), value: 10.0, p90: 10.0 },
        ];
        let svg = bar_chart("t", "ms", &bars, &[("E2B".into(), 4.0)]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(!svg.contains("a <b>"));
        assert_eq!(svg.matches("class=\"reference\"").count(), 1);
        assert!(!svg.contains("logarithmic"));
    }

    #[test]
    fn a_wide_span_is_drawn_on_a_log_scale() {
        let bars = vec![
            Bar { label: "fast".into(), value: 1.0, p90: 1.0 },
            Bar { label: "slow".into(), value: 1000.0, p90: 1000.0 },
        ];
        let svg = bar_chart("t", "ms", &bars, &[]);
        assert!(svg.contains("logarithmic scale"));
        // The 1 ms bar is visibly wide (a tenth of the plot), not a sliver.
        let widths: Vec<f64> = svg
            .match_indices(" width=\"")
            .skip(1)
            .map(|(at, _)| svg[at + 8..].split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(widths[0] > 30.0 && widths[1] > widths[0], "{widths:?}");
    }
}
