//! Per-kernel GPU time from timestamp queries: while profiling is on, [`super::Recorder::submit`]
//! gives every dispatch its own compute pass with a timestamp at its start and end, waits for the
//! submission, and adds each dispatch's time to its kernel's total.
//!
//! Profiling serialises submissions and adds a pass per dispatch, so it measures what each kernel
//! costs, not the throughput of an unprofiled run. `agentflux bench --profile` prints tables per
//! token; `AGENTFLUX_PROFILE=1` profiles any command and prints the table when its GPU context
//! closes.

use std::collections::HashMap;

/// Totals of one kernel (pipeline + entry point) over the profiled submissions.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KernelTime {
    /// Kernel name (shader, block format, entry point).
    pub name: String,
    /// Dispatches timed.
    pub calls: u64,
    /// GPU seconds spent in them.
    pub seconds: f64,
    /// Bytes they must move at least (weights, activations in and out), where the launcher says.
    pub bytes: u64,
}

impl KernelTime {
    /// Bytes moved per second, where the launcher declared its bytes.
    pub fn gb_per_s(&self) -> Option<f64> {
        (self.bytes > 0 && self.seconds > 0.0).then(|| self.bytes as f64 / self.seconds / 1e9)
    }
}

/// The running totals, by kernel name.
#[derive(Default)]
pub(crate) struct Profile {
    pub(crate) totals: HashMap<String, KernelTime>,
}

impl Profile {
    pub(crate) fn add(&mut self, name: &str, seconds: f64, bytes: u64) {
        let t = self.totals.entry(name.to_string()).or_insert_with(|| KernelTime { name: name.to_string(), ..Default::default() });
        t.calls += 1;
        t.seconds += seconds;
        t.bytes += bytes;
    }

    /// Totals, the most expensive kernel first.
    pub(crate) fn sorted(&self) -> Vec<KernelTime> {
        let mut v: Vec<KernelTime> = self.totals.values().cloned().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v
    }
}

/// A markdown table of `kernels`: dispatches and GPU milliseconds per `unit` (there were `per`
/// of them), share of the total, GB/s where known.
pub fn profile_table(kernels: &[KernelTime], per: usize, unit: &str) -> String {
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    let n = per.max(1) as f64;
    let mut s = format!("| kernel | dispatches/{unit} | ms/{unit} | share | GB/s |\n|---|---:|---:|---:|---:|\n");
    for k in kernels {
        let gb = k.gb_per_s().map(|g| format!("{g:.2}")).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {:.1} | {:.3} | {:.1}% | {gb} |\n",
            k.name,
            k.calls as f64 / n,
            k.seconds * 1e3 / n,
            100.0 * k.seconds / total.max(1e-12)
        ));
    }
    s
}
