//! The standard `process_*` metrics of the Prometheus client conventions
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`, `process_threads`), read from /proc/self when
//! /metrics is scraped. Written here rather than through the prometheus crate's
//! `process` feature, which brings procfs and its dependencies for the same few
//! reads. Off Linux (no /proc) the family is simply absent.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Opts};
use std::sync::Mutex;

/// USER_HZ: the unit of /proc's CPU times, 100 on every Linux architecture's user ABI.
const TICKS_PER_SECOND: f64 = 100.0;

pub(crate) struct ProcessCollector {
    cpu: Counter,
    rss: Gauge,
    vsize: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
    /// Two scrapes at once must not both add the same CPU-time increment.
    update: Mutex<()>,
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::with_opts(Opts::new(name, help)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

impl ProcessCollector {
    pub(crate) fn new() -> ProcessCollector {
        ProcessCollector {
            cpu: Counter::with_opts(Opts::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ))
            .unwrap_or_else(|e| panic!("process_cpu_seconds_total: {e}")),
            rss: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            vsize: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            open_fds: gauge("process_open_fds", "Number of open file descriptors."),
            max_fds: gauge(
                "process_max_fds",
                "Maximum number of open file descriptors (soft limit).",
            ),
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
            threads: gauge("process_threads", "Number of OS threads in the process."),
            update: Mutex::new(()),
        }
    }

    fn all(&self) -> [&dyn Collector; 7] {
        [
            &self.cpu,
            &self.rss,
            &self.vsize,
            &self.open_fds,
            &self.max_fds,
            &self.start_time,
            &self.threads,
        ]
    }

    /// Read /proc and set every value; false when /proc/self/stat is unreadable.
    fn refresh(&self) -> bool {
        let Some(stat) = read("/proc/self/stat").as_deref().and_then(Stat::parse) else {
            return false;
        };
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = (stat.utime + stat.stime) as f64 / TICKS_PER_SECOND;
        let delta = cpu - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        self.vsize.set(stat.vsize as f64);
        self.threads.set(stat.threads as f64);
        if let Some(btime) = read("/proc/stat").as_deref().and_then(boot_time) {
            self.start_time
                .set(btime as f64 + stat.starttime as f64 / TICKS_PER_SECOND);
        }
        // VmRSS is in kB whatever the page size (stat's rss is in pages).
        if let Some(kb) = read("/proc/self/status")
            .as_deref()
            .and_then(|s| field_kb(s, "VmRSS:"))
        {
            self.rss.set((kb * 1024) as f64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as f64);
        }
        if let Some(n) = read("/proc/self/limits")
            .as_deref()
            .and_then(max_open_files)
        {
            self.max_fds.set(n as f64);
        }
        true
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if !self.refresh() {
            return Vec::new();
        }
        self.all().into_iter().flat_map(|c| c.collect()).collect()
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The fields of /proc/self/stat this collector uses.
#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    starttime: u64,
    vsize: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Stat> {
        // `pid (comm) state ...`: comm may hold spaces and parentheses, so the
        // fields start after the last ')'. Field n (1-based, proc(5)) is index n - 3.
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: num(14)?,
            stime: num(15)?,
            threads: num(20)?,
            starttime: num(22)?,
            vsize: num(23)?,
        })
    }
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn field_kb(status: &str, key: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix(key))?;
    v.split_whitespace().next()?.parse().ok()
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_last_parenthesis() {
        let line = "4242 (consent gate) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 12345 987654321 2048 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 250,
                stime: 50,
                threads: 7,
                starttime: 12345,
                vsize: 987654321
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
        assert_eq!(Stat::parse("1 (x) S 1 2"), None);
    }

    #[test]
    fn limits_status_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(max_open_files(limits), Some(1_048_576));
        assert_eq!(field_kb("VmRSS:\t  12345 kB\n", "VmRSS:"), Some(12345));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1763600000\n"),
            Some(1_763_600_000)
        );
    }

    #[test]
    fn a_scrape_of_this_process_has_cpu_and_memory() {
        let c = ProcessCollector::new();
        let fams = c.collect();
        if std::path::Path::new("/proc/self/stat").exists() {
            let names: Vec<&str> = fams.iter().map(|f| f.name()).collect();
            for want in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ] {
                assert!(names.contains(&want), "{want} missing from {names:?}");
            }
            assert!(c.rss.get() > 0.0);
            assert!(c.open_fds.get() > 0.0);
            assert!(c.start_time.get() > 1_000_000_000.0);
        }
    }
}
