//! Horizontal bar charts drawn by hand as SVG: one `<rect class="bar">` per
//! bar (its median) and a thin line to its p90, labels on the left, values on
//! the right. No other rectangles, so a reader (or a test) can count bars.

use std::fmt::Write as _;

/// Pixel sizes of a chart (fixed: the charts are read in a Markdown page).
const WIDTH: f64 = 760.0;
const LABEL_WIDTH: f64 = 270.0;
const VALUE_WIDTH: f64 = 120.0;
const BAR_HEIGHT: f64 = 18.0;
const ROW_GAP: f64 = 8.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 16.0;

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

/// A chart of `bars` titled `title`, values in `unit` (such as "ms").
pub fn bar_chart(title: &str, unit: &str, bars: &[Bar]) -> String {
    let height = TOP + bars.len() as f64 * (BAR_HEIGHT + ROW_GAP) + BOTTOM;
    let plot = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let largest = bars.iter().map(|b| b.value.max(b.p90)).fold(0.0_f64, f64::max);
    let scale = if largest > 0.0 { plot / largest } else { 0.0 };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"  <text x="8" y="20" font-size="14" font-weight="bold">{} (median, line to p90; {})</text>"#,
        escape(title),
        escape(unit)
    );
    for (row, bar) in bars.iter().enumerate() {
        let y = TOP + row as f64 * (BAR_HEIGHT + ROW_GAP);
        let width = (bar.value * scale).max(1.0);
        let whisker = LABEL_WIDTH + (bar.p90 * scale).max(width);
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
        let svg = bar_chart("t", "ms", &bars);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(!svg.contains("a <b>"));
    }
}
