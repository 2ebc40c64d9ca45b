//! Where a piece of GPU work spends its device time: every kernel it launches, timed on the
//! device with wgpu timestamp queries where the adapter has them (the host clock around each
//! submit where it does not), summed by kernel.
//!
//! A [`Profiler`] installs a CubeCL launch observer for as long as it lives. Each launch is
//! bracketed by timestamps and its measurement kept unread, so the kernels still run back to
//! back; [`Profiler::finish`] reads them once the work is over. The CPU backend launches no
//! kernels: a profile taken there is empty (use `perf` on it).
//!
//! Code marks what it is doing with [`phase`] (the trainer: `forward`, `backward`, `update`);
//! each launch is counted under the phase current on the thread that issued it, so a profile
//! also says what each phase cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cubecl::logging::{Duration, LaunchObservation, LaunchObserver, ProfileDuration, TimingMethod, TimingRequest};
use serde::Serialize;

/// What one kernel (by name) took during the profiled work.
#[derive(Debug, Clone, Serialize)]
pub struct KernelTime {
    /// The kernel's name without its module path (generic arguments kept: they tell e.g. the
    /// elementwise operation apart).
    pub kernel: String,
    pub launches: usize,
    /// Device time summed over its launches.
    pub seconds: f64,
    /// Its part of all kernels' time.
    pub share: f64,
}

/// What one phase took (see [`phase`]).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    /// The phase's name; empty for launches outside any phase.
    pub phase: &'static str,
    pub launches: usize,
    pub seconds: f64,
    pub share: f64,
}

/// The kernels of one piece of work.
#[derive(Debug, Clone, Serialize)]
pub struct KernelProfile {
    /// `device` (timestamps written by the GPU) or `host` (the host clock around each submit,
    /// which counts submission too; kernels then run one at a time).
    pub timing: &'static str,
    /// Kernels launched, and how many of them carry a measurement.
    pub launches: usize,
    pub timed: usize,
    /// The kernels' time, summed.
    pub kernel_seconds: f64,
    /// From the first kernel's start to the last one's end (device timing only).
    pub span_seconds: Option<f64>,
    /// Time in that span during which no kernel ran: uploads, reads, host work the device
    /// waited for (device timing only).
    pub idle_seconds: Option<f64>,
    /// Host time from [`Profiler::start`] to the end of [`Profiler::finish`]'s wait.
    pub wall_seconds: f64,
    /// Most time first.
    pub kernels: Vec<KernelTime>,
    /// The same time by phase, in the order the phases first launched a kernel.
    pub phases: Vec<PhaseTime>,
}

impl KernelProfile {
    /// A Markdown table of the `top` costliest kernels, and a line with the totals.
    pub fn table(&self, top: usize) -> String {
        let mut s = String::from("| kernel | launches | ms | share |\n|---|---:|---:|---:|\n");
        for k in self.kernels.iter().take(top) {
            s += &format!("| `{}` | {} | {:.1} | {:.1}% |\n", elide(&k.kernel, 72), k.launches, k.seconds * 1e3, k.share * 100.0);
        }
        let rest: f64 = self.kernels.iter().skip(top).map(|k| k.seconds).sum();
        if self.kernels.len() > top {
            s += &format!("| {} other kernels | | {:.1} | {:.1}% |\n", self.kernels.len() - top, rest * 1e3, 100.0 * rest / self.kernel_seconds.max(f64::MIN_POSITIVE));
        }
        if self.phases.iter().any(|p| !p.phase.is_empty()) {
            let phases: Vec<String> = self
                .phases
                .iter()
                .map(|p| format!("{} {:.1} ms ({:.1}%, {} launches)", if p.phase.is_empty() { "other" } else { p.phase }, p.seconds * 1e3, p.share * 100.0, p.launches))
                .collect();
            s += &format!("by phase: {}\n", phases.join(", "));
        }
        s += &format!("{} launches ({} timed, {} timing): kernels {:.1} ms", self.launches, self.timed, self.timing, self.kernel_seconds * 1e3);
        if let (Some(span), Some(idle)) = (self.span_seconds, self.idle_seconds) {
            s += &format!(", first start to last end {:.1} ms, device idle {:.1} ms", span * 1e3, idle * 1e3);
        }
        s + &format!(", wall {:.1} ms", self.wall_seconds * 1e3)
    }
}

/// One launch's measurement: kept unread, or (when CubeCL's own profiling log is on and read
/// it first) its duration.
enum Measurement {
    Unread(&'static str, ProfileDuration),
    Read(&'static str, Duration, TimingMethod),
}

#[derive(Default)]
struct Recorder {
    /// Each launch as (phase, kernel), in order.
    launched: Mutex<Vec<(&'static str, &'static str)>>,
    /// Each measurement with the phase it was taken in.
    measured: Mutex<Vec<(&'static str, Measurement)>>,
}

/// The phase the process is in (one at a time: the launch observer is process-wide too).
static PHASE: Mutex<&'static str> = Mutex::new("");

/// Count the kernels launched until the guard drops under `name` (restoring the phase it
/// replaced). Costs a lock when no profile is running; nest freely.
#[must_use = "the phase ends when the guard drops"]
pub fn phase(name: &'static str) -> PhaseGuard {
    PhaseGuard { previous: std::mem::replace(&mut *lock(&PHASE), name) }
}

pub struct PhaseGuard {
    previous: &'static str,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        *lock(&PHASE) = self.previous;
    }
}

fn current_phase() -> &'static str {
    *lock(&PHASE)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LaunchObserver for Recorder {
    fn launched(&self, kernel: &'static str) {
        lock(&self.launched).push((current_phase(), kernel));
    }
    fn timing(&self) -> TimingRequest {
        TimingRequest::Deferred
    }
    fn profiled(&self, kernel: &'static str, profile: ProfileDuration) {
        lock(&self.measured).push((current_phase(), Measurement::Unread(kernel, profile)));
    }
    fn timed(&self, kernel: &'static str, duration: Duration, method: TimingMethod) {
        lock(&self.measured).push((current_phase(), Measurement::Read(kernel, duration, method)));
    }
}

/// Times every kernel launched (by any thread of the process) from [`Profiler::start`] to
/// [`Profiler::finish`].
pub struct Profiler {
    recorder: Arc<Recorder>,
    observation: LaunchObservation,
    started: web_time::Instant,
}

impl Profiler {
    pub fn start() -> Self {
        let recorder = Arc::new(Recorder::default());
        Profiler { observation: LaunchObservation::new(recorder.clone()), recorder, started: web_time::Instant::now() }
    }

    /// Stop observing, wait for the device to have run every launch, and sum them by kernel.
    pub async fn finish(self) -> KernelProfile {
        drop(self.observation);
        let launched = std::mem::take(&mut *lock(&self.recorder.launched));
        let measured = std::mem::take(&mut *lock(&self.recorder.measured));
        let mut per_kernel: HashMap<&'static str, f64> = HashMap::new();
        let mut per_phase: HashMap<&'static str, f64> = HashMap::new();
        let mut windows = Vec::new();
        let mut host_timed = false;
        let mut timed = 0;
        for (phase, m) in measured {
            let (kernel, seconds) = match m {
                Measurement::Unread(kernel, profile) => {
                    host_timed |= profile.timing_method() == TimingMethod::System;
                    let Some(ticks) = profile.resolve().await else { continue };
                    windows.push((ticks.start_duration_since(self.started), ticks.end_duration_since(self.started)));
                    (kernel, ticks.duration().as_secs_f64())
                }
                // No window: the span and idle time are then not reported (below).
                Measurement::Read(kernel, duration, method) => {
                    host_timed |= method == TimingMethod::System;
                    (kernel, duration.as_secs_f64())
                }
            };
            timed += 1;
            *per_kernel.entry(kernel).or_default() += seconds;
            *per_phase.entry(phase).or_default() += seconds;
        }
        let wall_seconds = self.started.elapsed().as_secs_f64();
        let kernel_seconds: f64 = per_kernel.values().sum();
        // Busy time: the union of the kernels' windows; idle is the rest of their span. Only
        // where the device's clock gave every window (host timing serialises the kernels).
        let (span_seconds, idle_seconds) = if host_timed || windows.len() != timed || windows.is_empty() {
            (None, None)
        } else {
            windows.sort();
            let (first, last) = (windows[0].0, windows.iter().map(|w| w.1).max().expect("not empty"));
            let (mut busy, mut end) = (0.0, first);
            for &(s, e) in &windows {
                let s = s.max(end);
                if e > s {
                    busy += (e - s).as_secs_f64();
                    end = e;
                }
            }
            let span = (last - first).as_secs_f64();
            (Some(span), Some((span - busy).max(0.0)))
        };
        // Launches by kernel, and by phase in the order the phases first appear.
        let mut by_kernel: HashMap<&'static str, usize> = HashMap::new();
        let mut by_phase: Vec<(&'static str, usize)> = Vec::new();
        for &(phase, kernel) in &launched {
            *by_kernel.entry(kernel).or_default() += 1;
            match by_phase.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, n)) => *n += 1,
                None => by_phase.push((phase, 1)),
            }
        }
        let mut kernels: Vec<KernelTime> = by_kernel
            .into_iter()
            .map(|(name, launches)| {
                let seconds = per_kernel.get(name).copied().unwrap_or(0.0);
                KernelTime { kernel: short_name(name), launches, seconds, share: seconds / kernel_seconds.max(f64::MIN_POSITIVE) }
            })
            .collect();
        // Two full names can shorten to the same one: merge them.
        kernels.sort_by(|a, b| a.kernel.cmp(&b.kernel));
        kernels.dedup_by(|a, b| {
            let same = a.kernel == b.kernel;
            if same {
                b.launches += a.launches;
                b.seconds += a.seconds;
                b.share += a.share;
            }
            same
        });
        kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(b.launches.cmp(&a.launches)));
        let phases = by_phase
            .into_iter()
            .map(|(phase, launches)| {
                let seconds = per_phase.get(phase).copied().unwrap_or(0.0);
                PhaseTime { phase, launches, seconds, share: seconds / kernel_seconds.max(f64::MIN_POSITIVE) }
            })
            .collect();
        KernelProfile { timing: if host_timed { "host" } else { "device" }, launches: launched.len(), timed, kernel_seconds, span_seconds, idle_seconds, wall_seconds, kernels, phases }
    }
}

/// `name` cut to `max` characters by dropping its middle.
fn elide(name: &str, max: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= max {
        return name.to_string();
    }
    let half = (max - 1) / 2;
    chars[..half].iter().chain(['…'].iter()).chain(&chars[chars.len() - half..]).collect()
}

/// `a::b::kernel<x::T, y::U>` → `kernel<T, U>`.
fn short_name(name: &str) -> String {
    let mut out = String::new();
    let mut segment = String::new();
    for c in name.chars() {
        match c {
            ':' => segment.clear(),
            '<' | '>' | ',' | ' ' | '(' | ')' | '[' | ']' | ';' | '&' => {
                out += &segment;
                segment.clear();
                out.push(c);
            }
            _ => segment.push(c),
        }
    }
    out + &segment
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_lose_their_module_paths() {
        assert_eq!(super::short_name("burn_cubecl::kernel::matmul::matmul_entry<f32, cubecl_std::Foo<u32>>"), "matmul_entry<f32, Foo<u32>>");
        assert_eq!(super::short_name("softmax"), "softmax");
        assert_eq!(super::elide("abcdefghij", 5), "ab…ij");
        assert_eq!(super::elide("abc", 5), "abc");
    }
}
