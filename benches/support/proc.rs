//! CPU time from `/proc` (user and system), for the benches' CPU-per-operation figures.

/// The command name and the CPU seconds in one `/proc/<pid>[/task/<tid>]/stat` text.
pub fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    // The command name is between the first '(' and the last ')' (it may hold spaces).
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(').map_or("", |(_, n)| n);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, the 14th and 15th fields; the kernel's USER_HZ is 100 on Linux.
    Some((name, (ticks(11) + ticks(12)) / 100.0))
}

/// CPU seconds used so far by the process (or thread) whose stat file is `path`
/// (`/proc/self/stat`, `/proc/<pid>/stat`); 0 when it cannot be read.
pub fn cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    stat_cpu(&stat).map_or(0.0, |(_, seconds)| seconds)
}
