//! Where the time goes: wall seconds per phase of the pipeline driver and of the GPU solve
//! (`GPTAQ_PROFILE=1`).
//!
//! The driver records each calibration batch into one command stream and submits it without
//! waiting, so a host timer around a phase measures nothing. With profiling on, every phase
//! boundary submits what was recorded and waits for the GPU, so each phase's wall time includes
//! its GPU work. Those waits serialise CPU and GPU, which is why this is off by default: use it
//! to find the phase that dominates, and the plain run for the total.

use std::time::Instant;

use super::{GpuContext, GpuError, Recorder};

pub(crate) struct Profile {
    enabled: bool,
    mark: Instant,
    /// Phase name → seconds, in first-seen order.
    phases: Vec<(String, f64)>,
}

impl Profile {
    pub(crate) fn from_env() -> Self {
        Self::new(std::env::var("GPTAQ_PROFILE").is_ok_and(|v| v == "1"))
    }

    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            mark: Instant::now(),
            phases: Vec::new(),
        }
    }

    fn add(&mut self, phase: &str) {
        let now = Instant::now();
        let dt = now.duration_since(self.mark).as_secs_f64();
        self.mark = now;
        match self.phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, s)) => *s += dt,
            None => self.phases.push((phase.to_string(), dt)),
        }
    }

    /// Ends a phase: submits `rec`, waits for the GPU and charges the time since the previous
    /// boundary to `phase`. Without profiling `rec` is returned untouched (nothing is submitted).
    pub(crate) fn lap<'c>(
        &mut self,
        rec: Recorder<'c>,
        phase: &str,
    ) -> Result<Recorder<'c>, GpuError> {
        if !self.enabled {
            return Ok(rec);
        }
        let ctx = rec.ctx();
        rec.submit();
        ctx.sync()?;
        self.add(phase);
        Ok(ctx.recorder())
    }

    /// Ends a phase that submitted its own work (the solve): waits for the GPU, charges `phase`.
    pub(crate) fn sync(&mut self, ctx: &GpuContext, phase: &str) -> Result<(), GpuError> {
        if self.enabled {
            ctx.sync()?;
            self.add(phase);
        }
        Ok(())
    }

    /// Adds `secs` measured elsewhere (a solve's own phases, reported inside the driver's
    /// "solve") under `phase`, without moving the boundary: such details are parts of another
    /// phase, not additional time. Nothing is recorded without profiling.
    pub(crate) fn detail(&mut self, phase: &str, secs: f64) {
        if !self.enabled {
            return;
        }
        match self.phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, s)) => *s += secs,
            None => self.phases.push((phase.to_string(), secs)),
        }
    }

    /// Starts timing from now (the time since the last boundary is not charged to any phase).
    pub(crate) fn restart(&mut self) {
        self.mark = Instant::now();
    }

    /// The phases measured since the last call, emptied.
    pub(crate) fn take(&mut self) -> Vec<(String, f64)> {
        std::mem::take(&mut self.phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_sum_in_first_seen_order() {
        let mut p = Profile::new(true);
        p.add("a");
        p.add("b");
        p.add("a");
        let got = p.take();
        assert_eq!(
            got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "phases in first-seen order, repeated ones summed: {got:?}"
        );
        assert!(got.iter().all(|(_, s)| *s >= 0.0), "{got:?}");
        assert!(p.take().is_empty(), "take empties");
        p.detail("d", 1.5);
        p.detail("d", 0.5);
        assert_eq!(p.take(), vec![("d".to_string(), 2.0)], "details sum");
        let mut off = Profile::new(false);
        off.detail("d", 1.0);
        assert!(off.take().is_empty(), "no details without profiling");
    }
}
