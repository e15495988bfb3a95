//! One output buffer written by parallel tasks, each in its own region: the
//! attention heads of the native text engines, the row blocks of a
//! convolution.

/// A raw pointer to an f32 buffer that may cross threads. Whoever builds one
/// keeps the buffer alive while tasks use it and gives no two tasks the same
/// region.
#[derive(Clone, Copy)]
pub struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint regions of one buffer that outlives them (the
// contract of `SharedOut::new`).
unsafe impl Send for SharedOut {}
// SAFETY: as for `Send`: no two tasks write the same region.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The buffer `values`, to be written by tasks in disjoint regions while
    /// it lives.
    pub fn new(values: &mut [f32]) -> Self {
        Self(values.as_mut_ptr())
    }

    /// A method, so that closures capture the whole (Send) wrapper rather
    /// than its raw-pointer field; wrapping, so that computing an address is
    /// safe: callers stay inside the buffer before writing through it.
    pub fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
