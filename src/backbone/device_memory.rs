//! The accelerator memory one backbone holds: the device's used memory (total
//! minus free, as its driver reports it) before the backbone loads and after
//! its warm-up. Backbones load one after another, so the difference is this
//! backbone's weights, activations kept in the allocator's pool and library
//! workspace. The CUDA context and the reading's own handles exist before the
//! first reading and count for no backbone (about 470 MiB for five backbones
//! on an H200: docs/BENCHMARKS.md); nvidia-smi shows the device's total.
//! Nothing on the CPU, whose memory the process's resident set reports.

use candle_core::Device;

use crate::config::DeviceSpec;

/// A reading taken before a load, to be finished after it.
pub struct DeviceMemoryProbe {
    device: Device,
    before: u64,
}

impl DeviceMemoryProbe {
    /// `None` on the CPU, in builds without a GPU backend, or when the driver
    /// does not answer (the load itself then reports the real problem).
    pub fn start(spec: DeviceSpec) -> Option<Self> {
        if spec == DeviceSpec::Cpu {
            return None;
        }
        let device = super::candle_device(spec).ok()?;
        let before = used_bytes(&device)?;
        Some(Self { device, before })
    }

    /// Bytes the device gained since [`Self::start`].
    pub fn finish(self) -> Option<u64> {
        used_bytes(&self.device).map(|after| after.saturating_sub(self.before))
    }
}

#[cfg(feature = "cuda")]
fn used_bytes(device: &Device) -> Option<u64> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    u64::try_from(total.saturating_sub(free)).ok()
}

#[cfg(not(feature = "cuda"))]
fn used_bytes(_device: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::DeviceMemoryProbe;
    use crate::config::DeviceSpec;

    #[test]
    fn the_cpu_has_no_device_memory_reading() {
        assert!(DeviceMemoryProbe::start(DeviceSpec::Cpu).is_none());
    }
}
