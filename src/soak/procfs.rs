//! Resident memory and open file descriptors of a process, from Linux `/proc/<pid>/`.

use std::path::PathBuf;

/// `VmRSS` in KiB from the text of `/proc/<pid>/status` (`VmRSS:     1234 kB`).
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> std::io::Result<u64> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(&path)?;
    parse_vm_rss_kib(&text)
        .ok_or_else(|| std::io::Error::other(format!("no VmRSS line in {}", path.display())))
}

/// Number of open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> std::io::Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        e?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_parsed_from_status_text() {
        let text = "Name:\tmbtd\nVmPeak:\t  99999 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss_kib(text), Some(20480));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        let f = std::fs::File::open("/proc/self/status").unwrap();
        // stdin, stdout, stderr and `f` at least.
        assert!(open_fds(me).unwrap() >= 4);
        drop(f);
    }
}
