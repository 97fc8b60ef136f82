//! Where a decode step's time goes: the wall time of each phase of the CPU decoder's
//! single-token forward passes (the layers' norms, products, RoPE, attention, activation and
//! residuals, and the final norm with the LM head), summed over the steps run while
//! recording is on. Off by default; while off a phase costs one relaxed atomic load.
//! Multi-token passes (prefill) and the device backend are not recorded.
//!
//! `jetvlm bench decode --phases` prints it per row.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// One phase of a decode step, in the order a layer runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The norm before attention (and Qwen3's q/k norms).
    AttentionNorm,
    /// The q/k/v products.
    Qkv,
    /// RoPE on the queries and keys.
    Rope,
    /// Writing the step's K/V into the cache and attending over it.
    Attention,
    /// The output projection.
    Output,
    /// The residual add after attention and the norm before the MLP.
    MlpNorm,
    /// The gate/up products.
    GateUp,
    /// SwiGLU / GeGLU.
    Activation,
    /// The down product.
    Down,
    /// The residual add after the MLP (and DeepStack features).
    Residual,
    /// The final norm and the LM head, and the logits' finite check.
    Head,
}

impl Phase {
    /// Every phase, in step order.
    pub const ALL: [Phase; 11] = [
        Phase::AttentionNorm,
        Phase::Qkv,
        Phase::Rope,
        Phase::Attention,
        Phase::Output,
        Phase::MlpNorm,
        Phase::GateUp,
        Phase::Activation,
        Phase::Down,
        Phase::Residual,
        Phase::Head,
    ];

    /// A short name (a table's column).
    pub fn name(self) -> &'static str {
        match self {
            Phase::AttentionNorm => "norm",
            Phase::Qkv => "qkv",
            Phase::Rope => "rope",
            Phase::Attention => "attention",
            Phase::Output => "o",
            Phase::MlpNorm => "norm2",
            Phase::GateUp => "gate/up",
            Phase::Activation => "act",
            Phase::Down => "down",
            Phase::Residual => "residual",
            Phase::Head => "head",
        }
    }
}

static RECORDING: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Phase::ALL.len()] = [const { AtomicU64::new(0) }; Phase::ALL.len()];
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Turns recording on or off (process-wide).
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// The time recorded per phase since the last call, and how many decode steps it covers
/// (the counters start again from zero).
pub fn take() -> PhaseTimes {
    PhaseTimes {
        nanos: NANOS.each_ref().map(|a| a.swap(0, Ordering::Relaxed)),
        steps: STEPS.swap(0, Ordering::Relaxed),
    }
}

/// Wall time per [`Phase`] (indexed as [`Phase::ALL`]) over `steps` decode steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    pub nanos: [u64; Phase::ALL.len()],
    pub steps: u64,
}

impl PhaseTimes {
    /// Milliseconds per step of `phase` (0 without steps).
    pub fn ms_per_step(&self, phase: Phase) -> f64 {
        let i = Phase::ALL.iter().position(|&p| p == phase).unwrap_or(0);
        if self.steps == 0 {
            return 0.0;
        }
        self.nanos[i] as f64 / self.steps as f64 / 1e6
    }
    /// Adds another record's times and steps.
    pub fn add(&mut self, other: &PhaseTimes) {
        for (a, b) in self.nanos.iter_mut().zip(other.nanos) {
            *a += b;
        }
        self.steps += other.steps;
    }
}

/// Times one step's phases: each [`Clock::lap`] charges the time since the previous one to a
/// phase. Inert unless recording is on and `on` (a single-token pass on the CPU).
pub(crate) struct Clock(Option<Instant>);

impl Clock {
    pub(crate) fn new(on: bool) -> Self {
        Clock((on && RECORDING.load(Ordering::Relaxed)).then(Instant::now))
    }
    pub(crate) fn lap(&mut self, phase: Phase) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            let i = phase as usize;
            NANOS[i].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
    /// Counts one decode step (once per forward pass).
    pub(crate) fn step(&self) {
        if self.0.is_some() {
            STEPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other tests of this binary may run single-token passes meanwhile; they can only add to
    /// the counters, so the checks are lower bounds.
    #[test]
    fn a_clock_charges_its_laps_only_while_recording() {
        set_recording(false);
        assert!(Clock::new(true).0.is_none(), "off by default");
        set_recording(true);
        assert!(Clock::new(false).0.is_none(), "not a timed pass");
        let mut c = Clock::new(true);
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.lap(Phase::Down);
        c.step();
        set_recording(false);
        let t = take();
        assert!(t.steps >= 1);
        assert!(t.ms_per_step(Phase::Down) * t.steps as f64 >= 2.0, "{t:?}");
        let mut sum = PhaseTimes::default();
        sum.add(&t);
        sum.add(&t);
        assert_eq!(sum.steps, 2 * t.steps);
        assert_eq!(PhaseTimes::default().ms_per_step(Phase::Head), 0.0);
        // The table's order is the enum's: a phase's index is its discriminant.
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{}", p.name());
        }
    }
}
