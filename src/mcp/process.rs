//! A tool server's process together with every process it starts. Wrappers such as `npx`, `uvx`
//! and `sh -c` run the real server as a grandchild, so stopping the direct child alone would
//! leave the server running. On Unix the server leads a process group of its own and the whole
//! group is killed; on Windows it runs in a job object that kills every process in it when stopped
//! or when its last handle closes (this process exiting included). Elsewhere the child alone.

use std::io;
use std::process::{Child, Command, ExitStatus};

/// A spawned server; dropping it stops it and what it started, and reaps it.
pub(super) struct ServerProcess {
    child: Child,
    #[cfg(windows)]
    job: Option<job::Job>,
    /// Whether it was stopped (it is, once).
    stopped: bool,
}

impl ServerProcess {
    /// Spawn `cmd` as the head of its own process group (Unix) or job (Windows).
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let child = cmd.spawn()?;
        Ok(Self {
            // A job that cannot be made (a sandbox that forbids nested jobs) leaves the child
            // alone to be stopped, as elsewhere.
            #[cfg(windows)]
            job: job::Job::holding(&child),
            child,
            stopped: false,
        })
    }

    /// The child, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// How it ended, if it has.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The server's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kill the server and every process of its group or job, then reap it; once.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        #[cfg(unix)]
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        #[cfg(windows)]
        if let Some(job) = &self.job {
            job.terminate();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(windows)]
mod job {
    use std::os::windows::io::AsRawHandle;
    use std::process::Child;
    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation, SetInformationJobObject, TerminateJobObject,
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    };

    /// An unnamed job object whose processes die with it.
    pub(super) struct Job(HANDLE);

    // SAFETY: a job handle names a kernel object; any thread may use or close it.
    unsafe impl Send for Job {}

    impl Job {
        /// A job holding `child` (and, from then on, whatever it starts), or `None` if Windows
        /// refused one. A process the child starts before it is assigned escapes the job: the
        /// assignment follows the spawn by microseconds, before a wrapper has started anything.
        pub(super) fn holding(child: &Child) -> Option<Self> {
            // SAFETY: the calls get a valid job handle (checked non-null, closed by `Drop`), a
            // zeroed plain-data struct of the size given, and the child's live process handle.
            unsafe {
                let handle = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if handle.is_null() {
                    return None;
                }
                let job = Job(handle);
                let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
                limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
                let size = std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32;
                let limited = SetInformationJobObject(handle, JobObjectExtendedLimitInformation, (&raw const limits).cast(), size) != 0;
                let assigned = limited && AssignProcessToJobObject(handle, child.as_raw_handle() as HANDLE) != 0;
                assigned.then_some(job)
            }
        }

        /// Kill every process in the job.
        pub(super) fn terminate(&self) {
            // SAFETY: the handle is this job's, open until `Drop`.
            unsafe {
                TerminateJobObject(self.0, 1);
            }
        }
    }

    #[cfg(test)]
    impl Job {
        /// The ids of the processes in the job (at most 64).
        pub(super) fn process_ids(&self) -> Vec<u32> {
            #[repr(C)]
            struct IdList {
                assigned: u32,
                listed: u32,
                ids: [usize; 64],
            }
            let mut list = IdList { assigned: 0, listed: 0, ids: [0; 64] };
            let size = std::mem::size_of::<IdList>() as u32;
            // SAFETY: the buffer is JOBOBJECT_BASIC_PROCESS_ID_LIST's layout with room for 64 ids.
            let ok = unsafe {
                windows_sys::Win32::System::JobObjects::QueryInformationJobObject(
                    self.0,
                    windows_sys::Win32::System::JobObjects::JobObjectBasicProcessIdList,
                    (&raw mut list).cast(),
                    size,
                    std::ptr::null_mut(),
                ) != 0
            };
            let listed = if ok { (list.listed as usize).min(64) } else { 0 };
            list.ids[..listed].iter().map(|&id| id as u32).collect()
        }
    }

    impl Drop for Job {
        fn drop(&mut self) {
            // SAFETY: the handle is open and closed only here.
            unsafe {
                CloseHandle(self.0);
            }
        }
    }
}

#[cfg(all(test, windows))]
mod tests {
    use super::*;
    use std::os::windows::process::CommandExt;
    use std::time::{Duration, Instant};
    use windows_sys::Win32::Foundation::{CloseHandle, WAIT_OBJECT_0};
    use windows_sys::Win32::System::Threading::{OpenProcess, WaitForSingleObject, PROCESS_SYNCHRONIZE};

    /// A wrapper (`cmd`) that starts a process in the background and waits on another: stopping
    /// it ends all three, seen through handles opened on each before the stop.
    #[test]
    fn stopping_a_wrapper_stops_what_it_started() {
        let mut cmd = Command::new("cmd");
        cmd.raw_arg("/c start /b ping -n 300 127.0.0.1 >nul & ping -n 300 127.0.0.1 >nul");
        let mut server = ServerProcess::spawn(&mut cmd).unwrap();
        let job = server.job.as_ref().expect("a job object");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut pids = job.process_ids();
        while pids.len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            pids = job.process_ids();
        }
        assert!(pids.len() >= 3, "the wrapper and its two pings in the job: {pids:?}");
        // SAFETY: OpenProcess takes plain values; each handle is closed below.
        let handles: Vec<_> = pids.iter().map(|&pid| unsafe { OpenProcess(PROCESS_SYNCHRONIZE, 0, pid) }).collect();
        assert!(handles.iter().all(|h| !h.is_null()), "a process of {pids:?} could not be opened");
        server.stop();
        for (h, pid) in handles.into_iter().zip(&pids) {
            // SAFETY: `h` is an open process handle, closed once.
            let ended = unsafe { WaitForSingleObject(h, 5000) } == WAIT_OBJECT_0;
            unsafe { CloseHandle(h) };
            assert!(ended, "process {pid} still runs after the stop");
        }
    }
}
