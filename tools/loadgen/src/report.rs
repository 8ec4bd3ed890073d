//! The one printer of the load modes' results: the lines the human-readable
//! reports of `relay`, `broker` and `http` share, and the machine-readable
//! `RESULT mode=<mode> key=value ...` line of every mode.
//!
//! The `RESULT` lines are an interface: scripts/bench and scripts/capacity
//! read their keys, so keys, their order and their number formats change only
//! together with those scripts (each mode's tests pin its line against the
//! format string it was printed with before).

use std::collections::BTreeMap;
use std::fmt::{self, Display, Write as _};

use hdrhistogram::Histogram;

use crate::monitor::ProcWindow;

/// Cores of this machine, the scale of every "busy cores" figure.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Prints `<label> latency ms: p50 … p90 … p99 … max … (n = …)`.
pub fn print_latency(label: &str, h: &Histogram<u64>) {
    println!(
        "{label} latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (n = {})",
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
}

/// Prints one `  <status>: <count>` line per status.
pub fn print_counts(counts: &BTreeMap<String, u64>) {
    for (k, v) in counts {
        println!("  {k}: {v}");
    }
}

/// What one load mode measured in its window: the figures every report
/// derives its rates, CPU shares and `RESULT` head from.
pub struct Window<'a> {
    /// Length of the measured window (s).
    pub secs: f64,
    /// Answers (or confirms) in the window.
    pub count: u64,
    /// Latency of those answers (µs).
    pub hist: &'a Histogram<u64>,
    /// CPU and RSS at the window's edges.
    pub proc: ProcWindow,
}

impl Window<'_> {
    /// Answers per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }

    /// CPU seconds this process spent in the window.
    pub fn self_cpu(&self) -> f64 {
        self.proc.self_cpu_at_end - self.proc.self_cpu_at_warm_end
    }

    /// CPU seconds of the relays in the window.
    pub fn relay_cpu(&self) -> f64 {
        self.proc.cpu_at_end - self.proc.cpu_at_warm_end
    }

    /// `cpu` seconds as busy cores over the window.
    pub fn cores_of(&self, cpu: f64) -> f64 {
        cpu / self.secs
    }

    /// `cpu` seconds per 1000 answers.
    pub fn per_thousand(&self, cpu: f64) -> f64 {
        cpu / (self.count.max(1) as f64 / 1000.0)
    }

    /// Busy cores of the whole machine over the window.
    pub fn system_cores(&self) -> f64 {
        self.proc.system_cores(self.secs)
    }

    /// `<label>: <rate>`, the rate rounded to a whole answer per second.
    pub fn rate_line(&self, label: &str) -> String {
        format!("{label}: {:.0}", self.rate())
    }

    /// `<label>: <cpu> s in the window = <cores> cores`.
    pub fn cpu_line(&self, label: &str, cpu: f64) -> String {
        format!(
            "{label}: {cpu:.2} s in the window = {:.2} cores",
            self.cores_of(cpu)
        )
    }

    /// `machine busy: <cores> of <all> cores`.
    pub fn machine_busy(&self) -> String {
        format!(
            "machine busy: {:.2} of {} cores",
            self.system_cores(),
            cores()
        )
    }

    /// The head every load mode's `RESULT` line starts with:
    /// `RESULT mode=<mode> rps= p50_ms= p90_ms= p99_ms= max_ms= n=`.
    pub fn result(&self, mode: &str) -> ResultLine {
        let ms = |micros: u64| micros as f64 / 1000.0;
        ResultLine::new(mode)
            .num("rps", self.rate(), 1)
            .num("p50_ms", ms(self.hist.value_at_quantile(0.5)), 3)
            .num("p90_ms", ms(self.hist.value_at_quantile(0.9)), 3)
            .num("p99_ms", ms(self.hist.value_at_quantile(0.99)), 3)
            .num("max_ms", ms(self.hist.max()), 3)
            .int("n", self.count)
    }
}

/// One machine-readable line: `RESULT mode=<mode>` and ` key=value` pairs
/// in the order they are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultLine(String);

impl ResultLine {
    /// `RESULT mode=<mode>`.
    pub fn new(mode: &str) -> Self {
        Self(format!("RESULT mode={mode}"))
    }

    /// ` key=value`, the value as it displays (counts).
    pub fn int(mut self, key: &str, value: impl Display) -> Self {
        let _ = write!(self.0, " {key}={value}");
        self
    }

    /// ` key=value` with `decimals` digits after the point.
    pub fn num(mut self, key: &str, value: f64, decimals: usize) -> Self {
        let _ = write!(self.0, " {key}={value:.decimals$}");
        self
    }

    /// Prints the line on stdout, where the scripts look for it.
    pub fn print(&self) {
        println!("{self}");
    }
}

impl Display for ResultLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist() -> Histogram<u64> {
        let mut h = Histogram::<u64>::new(3).expect("3 significant digits are valid");
        for v in [1_234u64, 2_345, 3_456, 45_678, 1_000_001] {
            h.record(v).expect("in range");
        }
        h
    }

    fn window(h: &Histogram<u64>) -> Window<'_> {
        Window {
            secs: 7.0,
            count: 12_345,
            hist: h,
            proc: ProcWindow {
                cpu_at_warm_end: 1.25,
                cpu_at_end: 9.5,
                self_cpu_at_warm_end: 0.5,
                self_cpu_at_end: 3.75,
                rss_end_kb: 20_480,
                rss_max_kb: 30_000,
                sys_busy_at_warm_end: 100.0,
                sys_busy_at_end: 111.5,
            },
        }
    }

    #[test]
    fn the_queue_line_is_a_bare_count() {
        assert_eq!(
            ResultLine::new("queue").int("delivered", 42u64).to_string(),
            "RESULT mode=queue delivered=42"
        );
    }

    #[test]
    fn the_shared_human_lines_keep_their_wording() {
        let h = hist();
        let w = window(&h);
        assert_eq!(w.rate_line("requests/s"), "requests/s: 1764");
        assert_eq!(
            w.cpu_line("publisher (loadgen) CPU", w.self_cpu()),
            "publisher (loadgen) CPU: 3.25 s in the window = 0.46 cores"
        );
        assert_eq!(
            w.machine_busy(),
            format!("machine busy: 1.64 of {} cores", cores())
        );
    }
}
