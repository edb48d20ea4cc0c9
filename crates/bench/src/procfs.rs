//! What `/proc` says about a process: resident memory (`VmRSS` in
//! `/proc/<pid>/status`), for the server's memory per session and the
//! generator's own footprint; and CPU time used (`utime + stime` in
//! `/proc/<pid>/stat`), for how many cores the server and the generator
//! burned during the measurement; and the whole machine's busy time
//! (`/proc/stat`), to tell when something else was using the CPUs.

use std::io;

/// Parses the `VmRSS:` line of a `/proc/<pid>/status` text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn read(path: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    parse_vm_rss_kib(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS line in {path}"),
        )
    })
}

/// `VmRSS` of process `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    read(&format!("/proc/{pid}/status"))
}

/// `VmRSS` of this process, in KiB.
pub fn self_rss_kib() -> io::Result<u64> {
    read("/proc/self/status")
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`: 100 on
/// every Linux architecture this runs on).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Parses `utime + stime` (clock ticks) from a `/proc/<pid>/stat` line.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time used by process `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)?;
    parse_cpu_ticks(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {path}")))
}

/// CPU time of several processes, added up (missing ones count zero).
pub fn cpu_ticks_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p).ok()).sum()
}

/// Busy clock ticks of the whole machine (all CPUs) from the `cpu` line
/// of `/proc/stat`: everything but idle and iowait.
pub fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    if v.len() < 8 {
        return None;
    }
    Some(v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// Busy clock ticks of the whole machine so far.
pub fn machine_busy_ticks() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_machine_busy_ticks(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "cannot parse /proc/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text = "Name:\tchatroom\nVmPeak:\t  123456 kB\nVmRSS:\t   45678 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(text), Some(45_678));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn parses_stat() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(line), Some(325));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn parses_proc_stat() {
        let text = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 50 2 25 500 3 1 1 0 0 0\n";
        assert_eq!(parse_machine_busy_ticks(text), Some(161));
        assert_eq!(parse_machine_busy_ticks("cpu0 1 2 3\n"), None);
        assert!(machine_busy_ticks().is_ok());
    }

    #[test]
    fn reads_own_and_other_processes() {
        // Burn a little CPU so the tick count can move.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ticks(std::process::id()).is_ok());
        assert!(cpu_ticks(u32::MAX).is_err());
        assert_eq!(cpu_ticks_sum(&[u32::MAX]), 0);
        let me = self_rss_kib().unwrap();
        assert!(me > 0);
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        assert!(vm_rss_kib(u32::MAX).is_err());
    }
}
