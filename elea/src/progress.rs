//! Progress of a long job as a command waits for it: a bar with bytes, rate and ETA on a
//! terminal; a plain line every few seconds when the output is not one (logs, CI); nothing
//! with `--json`, which prints one object at the end instead.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Time between plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    quiet: bool,
    started: Instant,
    first_done: Option<u64>,
    last_line: Option<Instant>,
}

impl Progress {
    /// A reporter for the job named `label`; `json` silences it.
    pub fn new(label: &str, json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(label.to_string());
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        Self {
            label: label.to_string(),
            bar,
            quiet: json,
            started: Instant::now(),
            first_done: None,
            last_line: None,
        }
    }

    /// `done` of `total` bytes; `msg` says what else there is to say (objects, failures).
    pub fn update(&mut self, done: u64, total: u64, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            b.set_message(msg.to_string());
            return;
        }
        if self.quiet {
            return;
        }
        let first = *self.first_done.get_or_insert(done);
        if self.last_line.is_some_and(|t| t.elapsed() < LINE_EVERY) {
            return;
        }
        self.last_line = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.5 { done.saturating_sub(first) as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 {
            format!("ETA {}", duration(Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate)))
        } else {
            "ETA -".to_string()
        };
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        println!(
            "{}: {} of {} ({pct:.0}%), {}/s, {eta}{}{msg}",
            self.label,
            bytes(done),
            bytes(total),
            bytes(rate as u64),
            if msg.is_empty() { "" } else { ", " },
        );
    }

    /// The job ended: clears the bar (the caller prints the outcome).
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Bytes in binary units ("1.5 GiB").
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// A duration as "1h02m", "3m05s" or "12s".
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_secs(12)), "12s");
        assert_eq!(duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(duration(Duration::from_secs(3720)), "1h02m");
    }
}
