//! Waiting for a cgroup to empty: the kernel rewrites `cgroup.events` (`populated 0`) when the
//! last process leaves, and inotify says so, so removing a workload's cgroup after
//! `cgroup.kill` waits for that instead of retrying `rmdir` on a timer.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

fn populated(cgroup: &Path) -> Option<bool> {
    let events = std::fs::read_to_string(cgroup.join("cgroup.events")).ok()?;
    events.lines().find_map(|l| l.strip_prefix("populated ")).map(|v| v.trim() != "0")
}

/// Blocks until no process is left in `cgroup` (or it is gone), at most `timeout`; whether it
/// emptied.
pub fn wait_until_empty(cgroup: &Path, timeout: Duration) -> bool {
    let events = cgroup.join("cgroup.events");
    // Watch first, then read: an exit between the two still wakes the wait.
    let watch = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .and_then(|i| i.add_watch(&events, AddWatchFlags::IN_MODIFY).map(|_| i));
    let deadline = Instant::now() + timeout;
    loop {
        match populated(cgroup) {
            None | Some(false) => return true,
            Some(true) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let Ok(inotify) = &watch else {
            // No inotify (out of watches): the cgroup is checked once more at the deadline.
            std::thread::sleep(left);
            continue;
        };
        let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)], wait);
        let _ = inotify.read_events();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cgroup_is_empty() {
        assert!(wait_until_empty(Path::new("/nonexistent/cgroup"), Duration::from_millis(10)));
    }
}
