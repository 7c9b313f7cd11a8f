//! Load generation and submission the benchmarks share.

// Each bench compiles this module and uses part of it.
#![allow(dead_code)]

/// The benches run the daemon with the allocator its binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use anyhow::bail;
use touchline::event::{Event, EventOutcome};
use touchline::store::StoreHandle;

/// An event id like a UUID's 32 hex digits after `prefix`, the same for
/// the same `(seed, n)` in every run (`--ids random`): spread over the
/// whole dedup table, as most publishers' ids are, where counted ids
/// land in key order.
pub fn random_id(prefix: &str, seed: u64, n: u64) -> String {
    // splitmix64, twice: independent of any generator the events use.
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    };
    let high = mix(seed ^ n.wrapping_mul(0x2545_F491_4F6C_DD1D));
    format!("{prefix}{high:016x}{:016x}", mix(high))
}

/// The value given after `flag` on the command line, which must be one
/// of `allowed`; `default` when the flag is absent.
pub fn flag_value(
    flag: &str,
    allowed: &[&'static str],
    default: &'static str,
) -> anyhow::Result<&'static str> {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == flag) else {
        return Ok(default);
    };
    let given = args.get(i + 1).map(String::as_str);
    match allowed.iter().find(|a| Some(**a) == given) {
        Some(value) => Ok(value),
        None => bail!("{flag} wants one of {allowed:?}, not {given:?}"),
    }
}

/// Submits `events` straight to a store in order, `batch` at a time, one
/// batch after the other, and fails unless every event was committed.
/// In order, so order-dependent rules (sequences, streaks) see what a
/// reference run sees; one large batch keeps the writer busy far longer
/// than the hand-over to the next takes.
pub async fn submit_committed(
    store: &StoreHandle,
    events: Vec<Event>,
    batch: usize,
) -> anyhow::Result<()> {
    let mut rest = events.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<Event> = rest.by_ref().take(batch).collect();
        let outcomes = store.submit(chunk).await?;
        if let Some(o) = outcomes
            .iter()
            .find(|o| !matches!(o, EventOutcome::Committed { .. }))
        {
            bail!("event not committed: {o:?}");
        }
    }
    Ok(())
}

/// Posts every body (a CloudEvents JSON batch) to `url` from `clients`
/// concurrent clients, each taking every `clients`-th body; fails on the
/// first answer other than 202.
pub async fn post_batches(
    url: &str,
    bodies: Arc<Vec<String>>,
    clients: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::with_capacity(clients);
    for k in 0..clients {
        let bodies = bodies.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for body in bodies.iter().skip(k).step_by(clients) {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body.clone())
                    .send()
                    .await?;
                if resp.status() != reqwest::StatusCode::ACCEPTED {
                    bail!("batch answered {}", resp.status());
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Resident memory of a process (`"self"` or a pid), in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// VmRSS: everything resident.
    pub total: u64,
    /// RssAnon: heap and stacks.
    pub anon: u64,
    /// RssFile: mapped file pages (LMDB's map), which the kernel can drop.
    pub file: u64,
}

pub fn rss_kib(process: &str) -> anyhow::Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{process}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Rss {
        total: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    })
}

/// Bytes this process has caused to be written to storage so far, as the
/// kernel counts them when pages are dirtied (`write_bytes` in
/// `/proc/self/io`): unlike time, the same work gives the same count on
/// a busy machine. `None` where the kernel does not say.
pub fn disk_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Each thread's name and nanoseconds on a CPU, by thread id.
pub type ThreadTimes = std::collections::BTreeMap<u32, (String, u64)>;

/// Time each of this process's threads has spent on a CPU so far: from
/// the kernel's scheduler statistics (exact), else from the tick counts
/// in `stat` (to 10 ms). Threads whose times cannot be read are left
/// out, and a system without `/proc` gives an empty map: the CPU split
/// is a figure the benchmark adds, not one it depends on.
pub fn thread_cpu() -> ThreadTimes {
    let mut threads = ThreadTimes::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return threads;
    };
    for entry in tasks.flatten() {
        let path = entry.path();
        let Some(tid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread that ends between the listing and the reads is
        // skipped. (One that ends inside a measured phase takes its time
        // in that phase with it; the daemon's threads outlive the runs.)
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if let Some(ns) = scheduled_ns(&path).or_else(|| ticked_ns(&path)) {
            threads.insert(tid, (name.trim().to_owned(), ns));
        }
    }
    threads
}

/// Nanoseconds the calling thread has spent on a CPU so far, from the
/// kernel's scheduler statistics. On a virtual machine whose kernel
/// accounts steal time (`CONFIG_PARAVIRT_TIME_ACCOUNTING`), time the
/// hypervisor gave to other guests is not counted here, while a wall
/// clock counts it. `None` where the kernel does not say.
pub fn this_thread_ns() -> Option<u64> {
    scheduled_ns(std::path::Path::new("/proc/thread-self"))
}

/// The machine's CPU time so far, in clock ticks summed over its CPUs:
/// all of it, and what the hypervisor stole (the eighth field of the
/// first line of `/proc/stat`). `None` where the kernel does not say.
pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some(MachineTicks {
        // Guest time is counted inside user time already.
        total: fields.iter().take(8).sum(),
        steal: *fields.get(7)?,
    })
}

/// See [`machine_ticks`].
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    pub total: u64,
    pub steal: u64,
}

impl MachineTicks {
    /// The share of the machine's CPU time stolen between `before` and
    /// this reading, 0 to 1.
    pub fn steal_since(&self, before: &MachineTicks) -> Option<f64> {
        let total = self.total.checked_sub(before.total)?;
        let steal = self.steal.checked_sub(before.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

/// The first field of `schedstat`: nanoseconds on a CPU.
fn scheduled_ns(task: &std::path::Path) -> Option<u64> {
    let stats = std::fs::read_to_string(task.join("schedstat")).ok()?;
    stats.split_whitespace().next()?.parse().ok()
}

/// `utime + stime` from `stat`, in clock ticks of 10 ms (the kernel's
/// fixed unit for these files). The name in parentheses may hold spaces,
/// so the fields are counted from its closing parenthesis: utime and
/// stime are the 12th and 13th after it.
fn ticked_ns(task: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10_000_000)
}

/// HTTP clients posting batches from a runtime of their own, whose
/// threads are named `thread_name`, so that their CPU time can be told
/// apart from the daemon's. Dropping it stops that runtime without
/// waiting for it, which async code may do (on every path, errors
/// included).
pub struct Clients {
    runtime: Option<tokio::runtime::Runtime>,
    url: String,
    clients: usize,
}

impl Clients {
    /// One thread: the clients only write pre-built bodies to sockets.
    pub fn start(thread_name: &str, url: &str, clients: usize) -> anyhow::Result<Clients> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread_name)
            .enable_all()
            .build()?;
        Ok(Clients {
            runtime: Some(runtime),
            url: url.to_owned(),
            clients,
        })
    }

    /// [`post_batches`] from the clients' runtime.
    pub async fn post(&self, bodies: Arc<Vec<String>>) -> anyhow::Result<()> {
        let Some(runtime) = &self.runtime else {
            bail!("the clients' runtime has stopped");
        };
        let (url, clients) = (self.url.clone(), self.clients);
        runtime
            .spawn(async move { post_batches(&url, bodies, clients).await })
            .await?
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
