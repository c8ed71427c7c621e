//! Small SVG plots for reports (no plotting dependency): line charts with
//! several series and labelled heatmap grids.

/// One line of a [`line_chart`]: a label and `(x, y)` points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Draw as a dashed horizontal reference line at the first point's `y`.
    pub reference: bool,
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Panels side by side, one per `(title, series)`, sharing the axes: `x`
/// ticks at `x_ticks`, `y` from `y_range.0` to `y_range.1`.
pub fn line_chart(
    title: &str,
    panels: &[(String, Vec<Series>)],
    x_label: &str,
    x_ticks: &[f64],
    y_label: &str,
    y_range: (f64, f64),
) -> String {
    let (pw, ph) = (300.0, 220.0);
    let (left, top, gap, bottom) = (55.0, 40.0, 30.0, 95.0);
    // Three panels per row; the legend under the last row.
    let per_row = 3usize;
    let rows = panels.len().div_ceil(per_row).max(1);
    let row_h = ph + 60.0;
    let w = left + per_row.min(panels.len().max(1)) as f64 * (pw + gap) + 10.0;
    let h = top + rows as f64 * row_h - 60.0 + bottom;
    let (x0, x1) = (
        x_ticks.iter().cloned().fold(f64::MAX, f64::min),
        x_ticks.iter().cloned().fold(f64::MIN, f64::max),
    );
    let span = (x1 - x0).max(1e-9);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"18\" font-size=\"13\">{}</text>\n",
        esc(title)
    );
    let mut labels: Vec<String> = Vec::new();
    let legend_y = top + (rows - 1) as f64 * row_h + ph;
    for (pi, (ptitle, series)) in panels.iter().enumerate() {
        let ox = left + (pi % per_row) as f64 * (pw + gap);
        let top = top + (pi / per_row) as f64 * row_h;
        let px = |x: f64| ox + (x - x0) / span * pw;
        let py = |y: f64| top + ph - (y - y_range.0) / (y_range.1 - y_range.0) * ph;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n<rect x=\"{ox}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n",
            ox + pw / 2.0,
            top - 6.0,
            esc(ptitle)
        ));
        for i in 0..=4 {
            let y = y_range.0 + (y_range.1 - y_range.0) * i as f64 / 4.0;
            let (x2, yy, tx, ty, t) = (ox + pw, py(y), ox - 4.0, py(y) + 4.0, format_tick(y));
            svg.push_str(&format!(
                "<line x1=\"{ox}\" x2=\"{x2}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#eee\"/><text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{t}</text>\n"
            ));
        }
        for &x in x_ticks {
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                px(x),
                top + ph + 14.0,
                format_tick(x)
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            ox + pw / 2.0,
            top + ph + 30.0,
            esc(x_label)
        ));
        for s in series {
            let ci = match labels.iter().position(|l| *l == s.label) {
                Some(i) => i,
                None => {
                    labels.push(s.label.clone());
                    labels.len() - 1
                }
            };
            let c = COLOURS[ci % COLOURS.len()];
            // Equal series would hide each other: shift each by a pixel or two.
            let jitter = (ci as f64 - 2.0) * 1.5;
            let py = |y: f64| py(y) + jitter;
            if s.reference {
                if let Some(&(_, y)) = s.points.first() {
                    let (x2, yy) = (ox + pw, py(y));
                    svg.push_str(&format!(
                        "<line x1=\"{ox}\" x2=\"{x2}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"{c}\" stroke-dasharray=\"5,4\" stroke-width=\"2\"/>\n"
                    ));
                }
                continue;
            }
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            svg.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>\n",
                pts.join(" ")
            ));
            for &(x, y) in &s.points {
                svg.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n",
                    px(x),
                    py(y)
                ));
            }
        }
    }
    svg.push_str(&format!(
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>\n",
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    ));
    for (i, l) in labels.iter().enumerate() {
        let x = left + (i % 4) as f64 * 170.0;
        let y = legend_y + 50.0 + (i / 4) as f64 * 16.0;
        svg.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            y - 4.0,
            COLOURS[i % COLOURS.len()],
            x + 18.0,
            y + 1.0,
            esc(l)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn format_tick(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        // At most 4 decimals, without float noise (1.0499999... -> 1.05).
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Grids side by side, one per `(title, cells)`; `cells[r][c]` in [0, 1] or
/// `None` (not run), coloured red (0) to green (1) and printed as a percent.
pub fn heatmaps(
    title: &str,
    grids: &[(String, Vec<Vec<Option<f64>>>)],
    row_labels: &[String],
    col_labels: &[String],
    row_axis: &str,
    col_axis: &str,
) -> String {
    let cell = 34.0;
    let (left, top, gap) = (70.0, 56.0, 24.0);
    let gw = col_labels.len() as f64 * cell;
    let per_row = 5usize;
    let rows_of_grids = grids.len().div_ceil(per_row).max(1);
    let gh = row_labels.len() as f64 * cell + 40.0;
    let w = left + per_row.min(grids.len()) as f64 * (gw + gap) + 10.0;
    let h = top + rows_of_grids as f64 * (gh + 24.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"10\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"13\">{}</text>\n<text x=\"10\" y=\"34\">rows: {}; columns: {}</text>\n",
        esc(title),
        esc(row_axis),
        esc(col_axis)
    );
    for (gi, (gtitle, cells)) in grids.iter().enumerate() {
        let ox = left + (gi % per_row) as f64 * (gw + gap);
        let oy = top + (gi / per_row) as f64 * (gh + 24.0);
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
            ox + gw / 2.0,
            oy + 8.0,
            esc(gtitle)
        ));
        for (r, row) in cells.iter().enumerate() {
            let y = oy + 14.0 + r as f64 * cell;
            if gi % per_row == 0 {
                svg.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                    ox - 4.0,
                    y + cell / 2.0 + 3.0,
                    esc(&row_labels[r])
                ));
            }
            for (c, v) in row.iter().enumerate() {
                let x = ox + c as f64 * cell;
                let (fill, text) = match v {
                    Some(v) => {
                        let red = (220.0 * (1.0 - v)) as u8 + 30;
                        let green = (180.0 * v) as u8 + 50;
                        (
                            format!("rgb({red},{green},70)"),
                            format!("{:.0}", v * 100.0),
                        )
                    }
                    None => ("#ddd".to_string(), String::new()),
                };
                svg.push_str(&format!(
                    "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"{fill}\" stroke=\"white\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\">{text}</text>\n",
                    x + cell / 2.0,
                    y + cell / 2.0 + 3.0
                ));
            }
        }
        for (c, l) in col_labels.iter().enumerate() {
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                ox + c as f64 * cell + cell / 2.0,
                oy + 14.0 + row_labels.len() as f64 * cell + 12.0,
                esc(l)
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}
