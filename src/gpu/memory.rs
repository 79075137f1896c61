//! Memory in use: the GPU buffers wgpu's backend has allocated for a context, and the process's
//! peak resident host memory.

use super::GpuContext;

/// One reading of memory in use, in bytes. A figure the platform does not report is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUse {
    /// GPU buffer memory allocated now (wgpu's Vulkan, Metal and DX12 backends count it).
    pub gpu_buffers: Option<u64>,
    /// The process's peak resident set so far (Linux: `VmHWM`).
    pub host_peak: Option<u64>,
}

impl GpuContext {
    /// Memory in use now, once the GPU has finished its work (so that buffers already dropped,
    /// including those only the reusable bind groups still named, and the staging of queued
    /// writes are freed rather than counted).
    pub fn memory_use(&self) -> MemoryUse {
        self.release_bind_groups();
        // The submission flushes queued writes, whose staging buffers are then freed; a failed
        // wait only leaves freed buffers counted a little longer.
        self.queue.submit([]);
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        let gpu = self.device.get_internal_counters().hal.buffer_memory.read();
        // A backend that does not count reads 0, and no context holds zero buffers.
        MemoryUse { gpu_buffers: u64::try_from(gpu).ok().filter(|&b| b > 0), host_peak: host_peak_rss() }
    }
}

/// `VmHWM` of /proc/self/status (kB) in bytes; `None` off Linux.
fn host_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kb(&status, "VmHWM:")
}

fn parse_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kilobytes_of_a_status_line() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_kb(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_kb(status, "VmSwap:"), None);
    }
}
