//! Samples CPU and RSS of the relay processes (if any), of this process and
//! of the whole machine at the edges of the measured window.

use std::time::Duration;

use tokio::time::Instant;

use crate::client::Clock;
use crate::procstat;

/// What the monitor measured about the relay processes, this process and
/// the machine during the window.
#[derive(Default, Debug, Clone, Copy)]
pub struct ProcWindow {
    /// CPU seconds of the relays (summed) when the window opens.
    pub cpu_at_warm_end: f64,
    /// CPU seconds of the relays (summed) when the window closes.
    pub cpu_at_end: f64,
    /// CPU seconds of this process when the window opens.
    pub self_cpu_at_warm_end: f64,
    /// CPU seconds of this process when the window closes.
    pub self_cpu_at_end: f64,
    /// RSS of the relays (summed, kB) when the window closes.
    pub rss_end_kb: u64,
    /// Largest RSS of the relays (summed, kB) sampled in the window.
    pub rss_max_kb: u64,
    /// Busy CPU seconds of the whole machine when the window opens.
    pub sys_busy_at_warm_end: f64,
    /// Busy CPU seconds of the whole machine when the window closes.
    pub sys_busy_at_end: f64,
}

impl ProcWindow {
    /// Busy cores of the whole machine during the window.
    pub fn system_cores(&self, secs: f64) -> f64 {
        (self.sys_busy_at_end - self.sys_busy_at_warm_end) / secs
    }
}

/// Sum of the processes' CPU seconds.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| procstat::cpu_secs(p)).sum()
}

/// Sum of the processes' RSS (kB); `None` without processes.
pub fn rss_of(pids: &[u32], read: fn(u32) -> Option<u64>) -> Option<u64> {
    (!pids.is_empty()).then(|| pids.iter().filter_map(|&p| read(p)).sum())
}

/// Samples the relays (if any) and this process at the window's edges and
/// every 250 ms in between (bounded by the clock).
pub async fn monitor(pids: Vec<u32>, clock: Clock) -> ProcWindow {
    let mut w = ProcWindow::default();
    tokio::time::sleep_until(clock.warm_end).await;
    w.self_cpu_at_warm_end = procstat::self_cpu_secs();
    w.sys_busy_at_warm_end = procstat::system_cpu_secs().0;
    w.cpu_at_warm_end = cpu_of(&pids);
    loop {
        w.rss_max_kb = w
            .rss_max_kb
            .max(rss_of(&pids, procstat::rss_kb).unwrap_or(0));
        let now = Instant::now();
        if now >= clock.end {
            break;
        }
        tokio::time::sleep_until((now + Duration::from_millis(250)).min(clock.end)).await;
    }
    w.self_cpu_at_end = procstat::self_cpu_secs();
    w.sys_busy_at_end = procstat::system_cpu_secs().0;
    w.cpu_at_end = cpu_of(&pids);
    w.rss_end_kb = rss_of(&pids, procstat::rss_kb).unwrap_or(0);
    w.rss_max_kb = w.rss_max_kb.max(w.rss_end_kb);
    w
}
