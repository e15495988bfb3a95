//! Where the time of the native engines' forward passes goes, by phase (wall
//! time of each phase; threads work inside phases). Collected only while
//! profiling (`tlserve bench-embed --profile`), process-wide; otherwise each
//! lap is one check of an empty slot.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug, Default, Clone)]
pub struct Profile {
    pub passes: usize,
    /// Tokens or images, as the engine counts its inputs.
    pub inputs: usize,
    pub phases: BTreeMap<&'static str, Duration>,
}

static PROFILE: Mutex<Option<Profile>> = Mutex::new(None);

/// Starts collecting a profile of native forward passes.
pub fn start() {
    *crate::sync::lock(&PROFILE) = Some(Profile::default());
}

/// Stops collecting and returns what was collected.
pub fn take() -> Option<Profile> {
    crate::sync::lock(&PROFILE).take()
}

/// Times the phases of one pass when profiling is on; a no-op otherwise.
pub(crate) struct Stopwatch {
    pass: Option<Profile>,
    last: Instant,
}

impl Stopwatch {
    pub fn start() -> Self {
        let pass = crate::sync::lock(&PROFILE)
            .as_ref()
            .map(|_| Profile::default());
        Self {
            pass,
            last: Instant::now(),
        }
    }

    /// Charges the time since the last lap to `phase`.
    pub fn lap(&mut self, phase: &'static str) {
        if let Some(pass) = &mut self.pass {
            let now = Instant::now();
            *pass.phases.entry(phase).or_default() += now - self.last;
            self.last = now;
        }
    }

    /// Adds the pass, of `inputs` inputs, to the profile being collected.
    pub fn finish(self, inputs: usize) {
        let Some(pass) = self.pass else { return };
        if let Some(total) = crate::sync::lock(&PROFILE).as_mut() {
            total.passes += 1;
            total.inputs += inputs;
            for (phase, time) in pass.phases {
                *total.phases.entry(phase).or_default() += time;
            }
        }
    }
}
