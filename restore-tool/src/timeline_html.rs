//! `tidemark-restore timeline --html FILE`: the audit as one self-contained
//! page — rows changed per table over time as an inline SVG chart, the
//! flagged transactions marked on it and listed below with the commands
//! that undo them.
//!
//! Nothing on the page refers outside it (no script, style sheet, font or
//! image by URL; links are `#fragments`), so it can be attached to a ticket,
//! opened on a host without network, and opening it tells no one anything.
//! Every text that comes from the data (table names are quoted SQL
//! identifiers and may hold `<`, `&` or quotes) goes through [`escape`].

use crate::audit::{is_unusual, Audit, Filter};
use crate::audit_report::{time_text, typical_of_tables, TimelineOptions};
use std::collections::BTreeMap;
use std::fmt::Write;
use tidemark_proto::wal::rmgr::XactStatus;
use tidemark_proto::wal::summary::Transaction;
use time::OffsetDateTime;

const MILLISECOND: i64 = 1_000;
const SECOND: i64 = 1_000_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Bucket widths a chart may use, narrowest first, with the page's name for
/// each. Neighbours differ by at most 4.3x, so the narrowest width that
/// fits in [`MAX_BUCKETS`] still gives 28 buckets or more.
const WIDTHS: [(i64, &str); 32] = [
    (MILLISECOND, "millisecond"),
    (2 * MILLISECOND, "2 milliseconds"),
    (5 * MILLISECOND, "5 milliseconds"),
    (10 * MILLISECOND, "10 milliseconds"),
    (20 * MILLISECOND, "20 milliseconds"),
    (50 * MILLISECOND, "50 milliseconds"),
    (100 * MILLISECOND, "100 milliseconds"),
    (200 * MILLISECOND, "200 milliseconds"),
    (500 * MILLISECOND, "500 milliseconds"),
    (SECOND, "second"),
    (2 * SECOND, "2 seconds"),
    (5 * SECOND, "5 seconds"),
    (10 * SECOND, "10 seconds"),
    (15 * SECOND, "15 seconds"),
    (30 * SECOND, "30 seconds"),
    (MINUTE, "minute"),
    (2 * MINUTE, "2 minutes"),
    (5 * MINUTE, "5 minutes"),
    (10 * MINUTE, "10 minutes"),
    (15 * MINUTE, "15 minutes"),
    (30 * MINUTE, "30 minutes"),
    (HOUR, "hour"),
    (2 * HOUR, "2 hours"),
    (3 * HOUR, "3 hours"),
    (6 * HOUR, "6 hours"),
    (12 * HOUR, "12 hours"),
    (DAY, "day"),
    (2 * DAY, "2 days"),
    (7 * DAY, "7 days"),
    (30 * DAY, "30 days"),
    (91 * DAY, "91 days"),
    (365 * DAY, "365 days"),
];

/// Bars stay about 9 pixels wide or more at the chart's width, wide enough
/// to point at; and a minute of traffic gets bars per second, a day per 15 minutes.
const MAX_BUCKETS: i64 = 120;

/// Tables charted on their own; the rest share one series, so the legend
/// stays readable and the colours distinct.
const MAX_SERIES: usize = 12;

/// Where the page's data came from, said on the page.
pub struct Provenance<'a> {
    /// The repository URL as given; credentials are removed before it is shown.
    pub repo: &'a str,
    /// When the page was made (RFC 3339, UTC).
    pub generated_at: &'a str,
    /// The command's filters as options (`--table ... --since ...`); empty for none.
    pub filters: &'a str,
}

/// A rendered page and what the command says about it.
pub struct Page {
    pub html: String,
    pub transactions: usize,
    pub flagged: usize,
}

/// The page for every transaction matching `filter` (not only the newest
/// `--limit`: the chart is a sum over the whole range).
pub fn page(audit: &Audit, filter: &Filter, provenance: &Provenance) -> Page {
    let transactions = audit.query(filter, None).transactions;
    let typical = typical_of_tables(audit, &transactions);
    let unusual = |table: &str, rows: u64| is_unusual(rows, typical.get(table).copied().flatten());
    let flagged = flagged(&transactions, &unusual).len();
    Page { html: render(&transactions, unusual, provenance), transactions: transactions.len(), flagged }
}

/// The filters of `options` as the options that set them, for the page.
pub fn filters_text(options: &TimelineOptions) -> String {
    let mut words = Vec::new();
    if let Some(table) = &options.table {
        words.push(format!("--table {}", shell_word(table)));
    }
    if let Some(since) = &options.since {
        words.push(format!("--since {}", shell_word(since)));
    }
    if let Some(until) = &options.until {
        words.push(format!("--until {}", shell_word(until)));
    }
    if let Some(xid) = options.xid {
        words.push(format!("--xid {}", xid.0));
    }
    words.join(" ")
}

/// The whole page. Pure: the same inputs give the same bytes.
/// `unusual(table, rows)` says whether a transaction changing `rows` rows of
/// `table` is far beyond what that table usually sees.
pub fn render(transactions: &[Transaction], unusual: impl Fn(&str, u64) -> bool, provenance: &Provenance) -> String {
    let repo = tidemark_repo::redact_url(provenance.repo);
    let flagged = flagged(transactions, &unusual);
    let mut out = String::with_capacity(64 * 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(out, "<title>WAL audit of {}</title>", escape(&repo));
    let _ = writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>\n<h1>WAL audit</h1>");
    out.push_str(&facts(transactions, flagged.len(), &repo, provenance));
    match chart_of(transactions) {
        Some(chart) => {
            let _ = writeln!(out, "<section>\n<h2>Rows changed per table, per {} (UTC)</h2>", width_name(chart.width));
            out.push_str(&svg(&chart, &flagged));
            out.push_str(&legend(&chart));
            out.push_str(
                "<p class=\"note\">Committed transactions only: an aborted one changed nothing. \
                Red markers are flagged transactions; each links to its row below.</p>\n</section>\n",
            );
        }
        None => out.push_str("<p>No transactions match.</p>\n"),
    }
    out.push_str(&flagged_section(&flagged, &unusual, &repo));
    let _ = writeln!(out, "<script>{SCRIPT}</script>\n</body>\n</html>");
    out
}

/// Committed transactions that changed some table far more than usual (an
/// aborted one changed nothing, so there is nothing to undo).
fn flagged<'a>(transactions: &'a [Transaction], unusual: &impl Fn(&str, u64) -> bool) -> Vec<&'a Transaction> {
    transactions
        .iter()
        .filter(|t| t.status == XactStatus::Committed)
        .filter(|t| t.tables.iter().any(|c| unusual(&c.table, c.inserted + c.updated + c.deleted)))
        .collect()
}

/// Text for HTML content and attribute values alike.
pub fn escape(text: &str) -> String {
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

/// `text` as one word of a POSIX shell command (quoted when it needs to be),
/// so a copied command runs as shown.
fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The narrowest bucket width that covers `first..=last` (Unix
/// microseconds) in at most [`MAX_BUCKETS`] buckets aligned to it.
fn bucket_width(first: i64, last: i64) -> i64 {
    WIDTHS
        .iter()
        .map(|(width, _)| *width)
        .find(|width| bucket_count(first, last, *width) <= MAX_BUCKETS)
        .unwrap_or(WIDTHS[WIDTHS.len() - 1].0)
}

fn bucket_count(first: i64, last: i64, width: i64) -> i64 {
    last.div_euclid(width) - first.div_euclid(width) + 1
}

fn width_name(width: i64) -> &'static str {
    WIDTHS.iter().find(|(w, _)| *w == width).map(|(_, name)| *name).unwrap_or("period")
}

fn utc(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A duration for people: `42 s`, `3 min 5 s`, `2 h 10 min`, `4 d 3 h`.
fn duration_text(micros: i64) -> String {
    let seconds = micros / SECOND;
    let (days, hours, minutes, secs) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    match (days, hours, minutes) {
        (0, 0, 0) if micros < SECOND => format!("{} ms", micros / MILLISECOND),
        (0, 0, 0) => format!("{secs} s"),
        (0, 0, _) => format!("{minutes} min {secs} s"),
        (0, _, _) => format!("{hours} h {minutes} min"),
        _ => format!("{days} d {hours} h"),
    }
}

/// The facts above the chart: repository, counts, span, filters, when made.
fn facts(transactions: &[Transaction], flagged: usize, repo: &str, provenance: &Provenance) -> String {
    let committed = transactions.iter().filter(|t| t.status == XactStatus::Committed).count();
    let span = match (transactions.iter().map(|t| t.time).min(), transactions.iter().map(|t| t.time).max()) {
        (Some(first), Some(last)) => {
            format!("{} to {} ({})", escape(&time_text(first)), escape(&time_text(last)), duration_text(last - first))
        }
        _ => "none".to_string(),
    };
    let filters = if provenance.filters.is_empty() {
        "none (every transaction the audit knows)".to_string()
    } else {
        format!("<code>{}</code>", escape(provenance.filters))
    };
    let mut out = String::from("<dl class=\"facts\">\n");
    let _ = writeln!(out, "<dt>Repository</dt><dd><code>{}</code></dd>", escape(repo));
    let _ = writeln!(
        out,
        "<dt>Transactions</dt><dd>{} ({committed} committed, {} aborted); \
         <strong>{flagged} flagged</strong> as unusual</dd>",
        transactions.len(),
        transactions.len() - committed
    );
    let _ = writeln!(out, "<dt>Time span</dt><dd>{span}</dd>");
    let _ = writeln!(out, "<dt>Filters</dt><dd>{filters}</dd>");
    let _ = writeln!(out, "<dt>Generated</dt><dd>{}</dd>\n</dl>", escape(provenance.generated_at));
    out
}

/// Rows changed per bucket for each charted table.
struct Chart {
    /// Start of the first bucket (Unix microseconds).
    start: i64,
    width: i64,
    buckets: usize,
    /// Most rows first; the last may gather the remaining tables.
    series: Vec<Series>,
}

struct Series {
    name: String,
    total: u64,
    rows: Vec<u64>,
}

impl Chart {
    fn end(&self) -> i64 {
        self.start + self.width * self.buckets as i64
    }
}

fn chart_of(transactions: &[Transaction]) -> Option<Chart> {
    let first = transactions.iter().map(|t| t.time).min()?;
    let last = transactions.iter().map(|t| t.time).max()?;
    let width = bucket_width(first, last);
    let start = first.div_euclid(width) * width;
    let buckets = bucket_count(first, last, width) as usize;
    let mut per_table: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for t in transactions.iter().filter(|t| t.status == XactStatus::Committed) {
        let bucket = ((t.time - start) / width) as usize;
        for c in &t.tables {
            let rows = per_table.entry(&c.table).or_insert_with(|| vec![0; buckets]);
            rows[bucket] += c.inserted + c.updated + c.deleted;
        }
    }
    let mut series: Vec<Series> = per_table
        .into_iter()
        .map(|(name, rows)| Series { name: name.to_string(), total: rows.iter().sum(), rows })
        .collect();
    series.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
    if series.len() > MAX_SERIES {
        let rest = series.split_off(MAX_SERIES - 1);
        let mut other = Series { name: format!("{} other tables", rest.len()), total: 0, rows: vec![0; buckets] };
        for s in rest {
            other.total += s.total;
            for (sum, rows) in other.rows.iter_mut().zip(s.rows) {
                *sum += rows;
            }
        }
        series.push(other);
    }
    Some(Chart { start, width, buckets, series })
}

/// Series colours, one per charted table: distinct hues and lightness, none
/// near the markers' red; grey last, for the series of the remaining tables.
const COLOURS: [&str; MAX_SERIES] = [
    "hsl(210, 60%, 45%)",
    "hsl(35, 85%, 50%)",
    "hsl(140, 50%, 38%)",
    "hsl(275, 45%, 55%)",
    "hsl(185, 60%, 38%)",
    "hsl(50, 75%, 42%)",
    "hsl(300, 40%, 50%)",
    "hsl(95, 45%, 50%)",
    "hsl(235, 50%, 65%)",
    "hsl(20, 45%, 40%)",
    "hsl(165, 40%, 60%)",
    "hsl(0, 0%, 55%)",
];

fn colour(index: usize) -> &'static str {
    COLOURS[index % COLOURS.len()]
}

// The chart's geometry, in SVG user units (the SVG scales to the page's width).
const SVG_WIDTH: f64 = 1200.0;
const SVG_HEIGHT: f64 = 380.0;
const LEFT: f64 = 72.0;
/// Room for half of the last time label.
const RIGHT: f64 = 40.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;
const PLOT_WIDTH: f64 = SVG_WIDTH - LEFT - RIGHT;
const PLOT_HEIGHT: f64 = SVG_HEIGHT - TOP - BOTTOM;

/// Maps times and row counts to chart coordinates.
struct Scale {
    start: i64,
    span: i64,
    /// The top of the y axis, a whole number of `step`s.
    top_rows: u64,
    step: u64,
}

impl Scale {
    fn of(chart: &Chart) -> Scale {
        let highest = (0..chart.buckets).map(|b| chart.series.iter().map(|s| s.rows[b]).sum::<u64>()).max();
        let step = nice_step(highest.unwrap_or(0).max(1).div_ceil(5));
        let top_rows = highest.unwrap_or(0).max(1).div_ceil(step) * step;
        Scale { start: chart.start, span: chart.end() - chart.start, top_rows, step }
    }

    fn x(&self, micros: i64) -> f64 {
        LEFT + (micros - self.start) as f64 / self.span as f64 * PLOT_WIDTH
    }

    fn y(&self, rows: u64) -> f64 {
        TOP + PLOT_HEIGHT - rows as f64 / self.top_rows as f64 * PLOT_HEIGHT
    }
}

/// The smallest 1, 2 or 5 times a power of ten that is at least `at_least`.
fn nice_step(at_least: u64) -> u64 {
    let mut power = 1u64;
    loop {
        for m in [1, 2, 5] {
            if m * power >= at_least {
                return m * power;
            }
        }
        power = power.saturating_mul(10);
    }
}

/// The chart: axes, stacked bars, then the flagged transactions' markers on top.
fn svg(chart: &Chart, flagged: &[&Transaction]) -> String {
    let scale = Scale::of(chart);
    let mut out = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {SVG_WIDTH} {SVG_HEIGHT}\" role=\"img\" \
         aria-label=\"Rows changed per table, per {}\">\n",
        width_name(chart.width)
    );
    y_axis(&mut out, &scale);
    x_axis(&mut out, chart, &scale);
    bars(&mut out, chart, &scale);
    markers(&mut out, flagged, &scale);
    out.push_str("</svg>\n");
    out
}

fn y_axis(out: &mut String, scale: &Scale) {
    let mut rows = 0;
    while rows <= scale.top_rows {
        let y = scale.y(rows);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{rows}</text>",
            LEFT + PLOT_WIDTH,
            LEFT - 6.0,
            y + 4.0
        );
        rows += scale.step;
    }
    let middle = TOP + PLOT_HEIGHT / 2.0;
    let _ = writeln!(
        out,
        "<text class=\"caption\" transform=\"translate(16 {middle}) rotate(-90)\" text-anchor=\"middle\">rows changed</text>"
    );
}

/// Time ticks at round times, about eight across, and the date of the start.
fn x_axis(out: &mut String, chart: &Chart, scale: &Scale) {
    let (start, end) = (chart.start, chart.end());
    let step = WIDTHS
        .iter()
        .map(|(w, _)| *w)
        .find(|w| *w >= chart.width && bucket_count(start, end, *w) <= 9)
        .unwrap_or(chart.width);
    let bottom = TOP + PLOT_HEIGHT;
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{bottom}\" y2=\"{bottom}\"/>",
        LEFT + PLOT_WIDTH
    );
    let several_days = utc(start).date() != utc(end - 1).date();
    let mut tick = start.div_euclid(step) * step;
    if tick < start {
        tick += step;
    }
    while tick <= end {
        let x = scale.x(tick);
        let _ = writeln!(
            out,
            "<line class=\"axis\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{bottom}\" y2=\"{}\"/>\
             <text class=\"tick\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            bottom + 5.0,
            bottom + 18.0,
            tick_text(tick, step, several_days)
        );
        tick += step;
    }
    let date = utc(start).date();
    let _ = writeln!(
        out,
        "<text class=\"caption\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (UTC), from {date}</text>",
        LEFT + PLOT_WIDTH / 2.0,
        SVG_HEIGHT - 8.0
    );
}

/// A tick's label, as precise as the tick step needs.
fn tick_text(micros: i64, step: i64, several_days: bool) -> String {
    let t = utc(micros);
    if step >= DAY {
        return t.date().to_string();
    }
    let clock = if step >= MINUTE {
        format!("{:02}:{:02}", t.hour(), t.minute())
    } else if step >= SECOND {
        format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
    } else {
        format!("{:02}:{:02}:{:02}.{:03}", t.hour(), t.minute(), t.second(), t.millisecond())
    };
    if several_days {
        format!("{:02}-{:02} {clock}", u8::from(t.month()), t.day())
    } else {
        clock
    }
}

fn bars(out: &mut String, chart: &Chart, scale: &Scale) {
    let bar = PLOT_WIDTH / chart.buckets as f64;
    // A gap between bars while they are wide enough to spare one.
    let gap = if bar > 4.0 { bar * 0.15 } else { 0.0 };
    for bucket in 0..chart.buckets {
        let from = chart.start + chart.width * bucket as i64;
        let x = scale.x(from) + gap / 2.0;
        let mut below = 0;
        for (index, series) in chart.series.iter().enumerate() {
            let rows = series.rows[bucket];
            if rows == 0 {
                continue;
            }
            // At least a pixel high: one row beside hundreds still shows.
            let bottom = scale.y(below);
            let top = scale.y(below + rows).min(bottom - 1.0);
            let _ = writeln!(
                out,
                "<rect x=\"{x:.2}\" y=\"{top:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"{}\">\
                 <title>{} from {}: {rows} rows</title></rect>",
                bar - gap,
                bottom - top,
                colour(index),
                escape(&series.name),
                escape(&time_text(from))
            );
            below += rows;
        }
    }
}

/// A marker at each flagged transaction's commit time, linking to its row.
fn markers(out: &mut String, flagged: &[&Transaction], scale: &Scale) {
    for t in flagged {
        let x = scale.x(t.time);
        let rows: u64 = t.tables.iter().map(|c| c.inserted + c.updated + c.deleted).sum();
        let _ = writeln!(
            out,
            "<a class=\"marker\" href=\"#xid-{xid}\"><title>xid {xid}, committed {}: {rows} rows</title>\
             <line x1=\"{x:.2}\" x2=\"{x:.2}\" y1=\"{}\" y2=\"{}\"/>\
             <path d=\"M{:.2} {} L{:.2} {} L{x:.2} {} Z\"/>\
             <text x=\"{x:.2}\" y=\"{}\" text-anchor=\"middle\">{xid}</text></a>",
            escape(&time_text(t.time)),
            TOP - 6.0,
            TOP + PLOT_HEIGHT,
            x - 6.0,
            TOP - 16.0,
            x + 6.0,
            TOP - 16.0,
            TOP - 6.0,
            TOP - 20.0,
            xid = t.xid
        );
    }
}

fn legend(chart: &Chart) -> String {
    let mut out = String::from("<ul class=\"legend\">\n");
    for (index, series) in chart.series.iter().enumerate() {
        let _ = writeln!(
            out,
            "<li><span class=\"swatch\" style=\"background: {}\"></span><code>{}</code> {} rows</li>",
            colour(index),
            escape(&series.name),
            series.total
        );
    }
    out.push_str("</ul>\n");
    out
}

/// The flagged transactions, each with the two ways back from it.
fn flagged_section(flagged: &[&Transaction], unusual: &impl Fn(&str, u64) -> bool, repo: &str) -> String {
    let mut out = String::from("<section>\n<h2>Flagged transactions</h2>\n");
    if flagged.is_empty() {
        out.push_str("<p>None: no transaction changed a table far more than its transactions usually do.</p>\n");
        return out + "</section>\n";
    }
    out.push_str(
        "<p class=\"note\">Each changed some table ten times more rows than its transactions usually do \
         (and at least 50). Undo one in place with <code>repair</code> (review its dry run first), or \
         restore a copy as it was just before it into a new data directory.</p>\n",
    );
    out.push_str(
        "<table class=\"flagged\">\n<thead><tr><th>xid</th><th>commit time (UTC)</th>\
        <th>tables: inserted / updated / deleted</th><th>commands</th></tr></thead>\n<tbody>\n",
    );
    let repo = shell_word(repo);
    for t in flagged {
        let _ = write!(
            out,
            "<tr id=\"xid-{xid}\"><td class=\"xid\">{xid}</td><td class=\"time\">{}</td><td><ul class=\"changes\">",
            escape(&time_text(t.time)),
            xid = t.xid
        );
        for c in &t.tables {
            let rows = c.inserted + c.updated + c.deleted;
            let badge = if unusual(&c.table, rows) { " <span class=\"badge\">unusual</span>" } else { "" };
            let _ = write!(
                out,
                "<li><code>{}</code> {} / {} / {}{badge}</li>",
                escape(&c.table),
                c.inserted,
                c.updated,
                c.deleted
            );
        }
        out.push_str("</ul></td><td>");
        let repair =
            format!("tidemark-restore --repo {repo} repair --xid {} --dry-run --into postgresql://USER@HOST/DB", t.xid);
        let restore =
            format!("tidemark-restore --repo {repo} restore --before-xid {} --pgdata /path/to/new/data", t.xid);
        out.push_str(&command("Repair in place (dry run; put in the live database's URL)", &repair));
        out.push_str(&command("Or restore to just before it, into a new data directory", &restore));
        out.push_str("</td></tr>\n");
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
    out
}

/// A command shown whole, selectable, with a copy button.
fn command(what: &str, text: &str) -> String {
    format!(
        "<div class=\"command\"><div class=\"what\">{}</div><pre><code>{}</code></pre>\
         <button type=\"button\" class=\"copy\">Copy</button></div>",
        escape(what),
        escape(text)
    )
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 78rem; padding: 0 1rem;
  color: #1d232a; background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 0.5rem; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.9em; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1rem; margin: 0; }
.facts dt { font-weight: 600; }
.facts dd { margin: 0; }
.chart { width: 100%; height: auto; display: block; }
.chart .grid { stroke: #e3e7eb; }
.chart .axis { stroke: #5b6670; }
.chart .tick { font-size: 12px; fill: #3c4650; }
.chart .caption { font-size: 13px; fill: #3c4650; }
.chart .marker line { stroke: #c8102e; stroke-width: 1.5; stroke-dasharray: 4 3; }
.chart .marker path { fill: #c8102e; }
.chart .marker text { font-size: 12px; font-weight: 600; fill: #c8102e; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.35em; vertical-align: -0.1em;
  border-radius: 2px; }
.note { color: #4a5560; font-size: 0.92rem; }
table.flagged { border-collapse: collapse; width: 100%; }
.flagged th, .flagged td { border-top: 1px solid #d5dbe0; padding: 0.5rem; text-align: left; vertical-align: top; }
.flagged tr:target { background: #fff4c2; }
.flagged .xid { font-weight: 600; }
.flagged .time { white-space: nowrap; }
.changes { margin: 0; padding-left: 1rem; }
.badge { background: #c8102e; color: #fff; border-radius: 3px; padding: 0 0.3em; font-size: 0.8em; }
.command { margin-bottom: 0.6rem; }
.command .what { font-size: 0.85rem; color: #4a5560; }
.command pre { margin: 0.2rem 0; padding: 0.4rem 0.5rem; background: #f2f4f6; border-radius: 4px;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.copy { font-size: 0.8rem; }
";

/// The copy buttons: the clipboard where the browser allows it (a page
/// opened from a file may not), else the command selected for Ctrl-C.
const SCRIPT: &str = "
document.addEventListener('click', function (event) {
  var button = event.target.closest('button.copy');
  if (!button) { return; }
  var code = button.previousElementSibling;
  var select = function () {
    var range = document.createRange();
    range.selectNodeContents(code);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  };
  if (navigator.clipboard) {
    navigator.clipboard.writeText(code.textContent).then(function () { button.textContent = 'Copied'; }, select);
  } else {
    select();
  }
});
";

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_proto::wal::summary::TableChange;

    fn change(table: &str, updated: u64) -> TableChange {
        TableChange { table: table.to_string(), inserted: 1, updated, deleted: 0 }
    }

    fn transaction(xid: u32, seconds: i64, tables: Vec<TableChange>) -> Transaction {
        Transaction {
            xid,
            status: XactStatus::Committed,
            time: 1_795_000_000 * SECOND + seconds * SECOND,
            lsn: u64::from(xid) * 100,
            timeline: 1,
            tables,
        }
    }

    const PROVENANCE: Provenance = Provenance {
        repo: "s3://alice:s3cr3t@bucket/prefix",
        generated_at: "2026-11-27T06:30:00Z",
        filters: "--table '\"AttendanceRecord\"'",
    };

    /// A minute of one-row transactions on two tables and one bad UPDATE.
    fn workload() -> Vec<Transaction> {
        let mut all: Vec<Transaction> = (0..60)
            .map(|i| {
                let table = if i % 2 == 0 { "public.\"AttendanceRecord\"" } else { "public.users" };
                transaction(700 + i, i64::from(i), vec![change(table, 0)])
            })
            .collect();
        all.push(transaction(790, 61, vec![change("public.\"AttendanceRecord\"", 640)]));
        all
    }

    fn unusual(_table: &str, rows: u64) -> bool {
        rows >= 50
    }

    #[test]
    fn data_is_escaped_everywhere() {
        assert_eq!(escape(r#"public."A&B" <x> 'y'"#), "public.&quot;A&amp;B&quot; &lt;x&gt; &#39;y&#39;");
        let nasty = "public.\"<script>alert(1)</script>&amp\"";
        let transactions =
            vec![transaction(7, 0, vec![change(nasty, 500)]), transaction(8, 30, vec![change(nasty, 1)])];
        let page = render(&transactions, unusual, &PROVENANCE);
        assert!(!page.contains("<script>alert"), "an unescaped table name");
        assert!(page.contains("public.&quot;&lt;script&gt;alert(1)&lt;/script&gt;&amp;amp&quot;"));
        // The one script element is ours.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<code>--table &#39;&quot;AttendanceRecord&quot;&#39;</code>"), "filters escaped");
    }

    #[test]
    fn bucket_width_keeps_between_20_and_120_bars() {
        let t0 = 1_795_000_000 * SECOND;
        assert_eq!(bucket_width(t0, t0 + MINUTE), SECOND);
        assert_eq!(bucket_width(t0, t0 + HOUR), MINUTE);
        assert_eq!(bucket_width(t0, t0 + DAY), 15 * MINUTE);
        assert_eq!(bucket_width(t0, t0 + 30 * DAY), 12 * HOUR);
        assert_eq!(bucket_width(t0, t0), MILLISECOND);
        // Every span from a second to ten years: 20..=120 buckets.
        let mut span = SECOND;
        while span < 3650 * DAY {
            for first in [t0, t0 + 7 * SECOND + 123, t0 - 13 * HOUR] {
                let n = bucket_count(first, first + span, bucket_width(first, first + span));
                assert!((20..=MAX_BUCKETS).contains(&n), "span {span} µs: {n} buckets");
            }
            span = span * 11 / 10;
        }
    }

    #[test]
    fn flagged_transactions_are_marked_linked_and_listed_with_commands() {
        let page = render(&workload(), unusual, &PROVENANCE);
        assert!(page.contains("<a class=\"marker\" href=\"#xid-790\">"), "no marker");
        assert!(page.contains("<tr id=\"xid-790\">"), "no row");
        assert!(page.contains(
            "tidemark-restore --repo s3://bucket/prefix repair --xid 790 --dry-run --into postgresql://USER@HOST/DB"
        ));
        assert!(page.contains(
            "tidemark-restore --repo s3://bucket/prefix restore --before-xid 790 --pgdata /path/to/new/data"
        ));
        assert!(!page.contains("s3cr3t") && !page.contains("alice"), "credentials on the page");
        assert_eq!(page.matches("class=\"marker\"").count(), 1, "only the bad UPDATE is flagged");
        assert!(page.contains("<strong>1 flagged</strong>"));
        assert!(page.contains("61 (61 committed, 0 aborted)"));
        assert!(page.contains("Rows changed per table, per second (UTC)"));
        // Both tables have a colour in the legend, the heavier first.
        let attendance = page.find("<li><span class=\"swatch\" style=\"background: hsl(210, 60%, 45%)\"></span><code>public.&quot;AttendanceRecord&quot;</code>");
        let users = page.find("<code>public.users</code> 30 rows");
        assert!(attendance.is_some() && users.is_some() && attendance < users, "legend");
    }

    #[test]
    fn an_aborted_transaction_is_not_flagged() {
        let mut transactions = workload();
        transactions.last_mut().expect("bad update").status = XactStatus::Aborted;
        let page = render(&transactions, unusual, &PROVENANCE);
        assert!(!page.contains("xid-790"));
        assert!(page.contains("61 (60 committed, 1 aborted)"));
    }

    #[test]
    fn the_page_refers_to_nothing_outside_it() {
        for transactions in [workload(), Vec::new()] {
            let page = render(&transactions, unusual, &PROVENANCE);
            assert!(!page.to_ascii_lowercase().contains("http"), "{page}");
            for attribute in [" src=", " srcset=", " action=", "@import", "xlink:href"] {
                assert!(!page.contains(attribute), "{attribute}");
            }
            for link in page.split(" href=\"").skip(1) {
                assert!(link.starts_with('#'), "a link out: {}", &link[..40.min(link.len())]);
            }
            assert!(!page.contains("url("));
        }
    }

    #[test]
    fn many_tables_share_one_series_past_the_twelfth() {
        let transactions: Vec<_> =
            (0..20).map(|i| transaction(i, i64::from(i), vec![change(&format!("public.t{i:02}"), 1)])).collect();
        let chart = chart_of(&transactions).expect("chart");
        assert_eq!(chart.series.len(), MAX_SERIES);
        assert_eq!(chart.series[MAX_SERIES - 1].name, "9 other tables");
        assert_eq!(chart.series.iter().map(|s| s.total).sum::<u64>(), 40);
    }

    #[test]
    fn words_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(shell_word("file:///backups/tidemark"), "file:///backups/tidemark");
        assert_eq!(shell_word("file:///my backups/it's"), "'file:///my backups/it'\\''s'");
        assert_eq!(shell_word("\"AttendanceRecord\""), "'\"AttendanceRecord\"'");
    }

    #[test]
    fn durations_and_ticks_read_well() {
        assert_eq!(duration_text(61 * SECOND), "1 min 1 s");
        assert_eq!(duration_text(3 * DAY + 2 * HOUR), "3 d 2 h");
        assert_eq!(duration_text(250 * MILLISECOND), "250 ms");
        let micros = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1000) as i64;
        let moment = micros(time::macros::datetime!(2026-11-27 06:19:24.356 UTC));
        assert_eq!(tick_text(moment, MINUTE, false), "06:19");
        assert_eq!(tick_text(moment, 5 * SECOND, false), "06:19:24");
        assert_eq!(tick_text(moment, 100 * MILLISECOND, false), "06:19:24.356");
        assert_eq!(tick_text(moment, HOUR, true), "11-27 06:19");
        assert_eq!(tick_text(moment, DAY, true), "2026-11-27");
    }
}
