//! The engine a backbone computes on and the number format it computes in,
//! decided in one place for every family: the native engine (our CPU
//! kernels) or candle's graph (any device), and what `precision = "auto"`
//! means on each. A family states only what it refuses beyond the engines'
//! own limits.

use candle_core::Device;

use super::catalog::Family;
use crate::{
    config::{BackboneConfig, Engine, Precision},
    nn, Error, Result,
};

/// The engine `config.engine` resolves to on `device`, and the number format
/// `config.precision` resolves to on that engine for a backbone of `family`:
/// `auto` is bf16 on CPUs with AMX-BF16, else f32, on the native engine; f16
/// on a GPU, else f32, on candle's (as sentence-transformers and
/// text-embeddings-inference serve GPUs). Image networks compute in f32.
pub fn choose(
    config: &BackboneConfig,
    family: Family,
    device: &Device,
) -> Result<(Engine, Precision)> {
    let engine = config.resolved_engine();
    if engine == Engine::Native && !device.is_cpu() {
        return Err(Error::ModelLoad(
            "the native engine runs on CPU; use engine = \"candle\" on a GPU".into(),
        ));
    }
    if let Some(reason) = refusal(family, engine, config.precision) {
        return Err(Error::ModelLoad(reason));
    }
    let precision = match (family, engine, config.precision) {
        // Config validation refuses a reduced precision for images.
        (Family::Vision(_), _, _) => Precision::F32,
        (_, Engine::Native, chosen) => nn::resolve_precision(chosen),
        (_, _, Precision::Auto) if device.is_cpu() => Precision::F32,
        (_, _, Precision::Auto) => Precision::F16,
        (_, _, chosen) => chosen,
    };
    Ok((engine, precision))
}

/// Why `family` cannot compute in `precision` on `engine`, if it cannot.
fn refusal(family: Family, engine: Engine, precision: Precision) -> Option<String> {
    if family == Family::Llama && engine == Engine::Native {
        match precision {
            // candle's quantized CPU products are the only ones that take
            // the file's blocks as they are.
            Precision::Quantized => {
                return Some(
                    "precision = \"quantized\" runs on the candle engine (GPUs); candle's \
                     quantized products ran 35 times slower than f32 on the CPU"
                        .into(),
                )
            }
            // A decoder's activations have outlier channels that one int8
            // scale per row flattens: pooled features fell to cosine 0.955 of
            // the float64 reference (docs/PERFORMANCE.md, "Decoder backbones").
            Precision::Int8 => {
                return Some(
                    "precision = \"int8\" is too lossy for decoders; use \"bf16\" or \"quantized\""
                        .into(),
                )
            }
            _ => {}
        }
    }
    let runs = match engine {
        Engine::Native => precision.native_engine_runs(),
        Engine::Candle | Engine::Auto => precision.candle_engine_runs(),
    };
    (!runs).then(|| {
        format!(
            "the {} engine does not compute in precision = \"{}\"",
            engine.as_str(),
            precision.as_str()
        )
    })
}

/// What computes the dense layers, for the start-up log: candle's kernels
/// for its device, or the instructions the native engine uses for
/// `precision` on this CPU.
pub fn kernel_name(engine: Engine, precision: Precision) -> &'static str {
    if engine != Engine::Native {
        return "candle";
    }
    match precision {
        Precision::Auto | Precision::F32 => {
            nn::packed::F32Kernel::detect().map_or("gemm (f32)", nn::packed::F32Kernel::as_str)
        }
        Precision::Int8 => nn::int8::Int8Kernel::detect().as_str(),
        Precision::Bf16 => nn::bf16::Bf16Kernel::detect().as_str(),
        Precision::F16 => "none (f16 runs on the candle engine)",
        Precision::Quantized => "none (quantized is for GGUF backbones)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VggFeatures;

    fn config(architecture: &str, engine: &str, precision: &str) -> BackboneConfig {
        toml::from_str(&format!(
            "name = \"t\"\narchitecture = \"{architecture}\"\nsource = {{ path = \"m\" }}\n\
             engine = \"{engine}\"\nprecision = \"{precision}\"\n"
        ))
        .expect("config")
    }

    #[test]
    fn each_family_gets_the_engines_limits_and_its_own() {
        let cpu = Device::Cpu;
        let choose_for = |architecture, family, engine, precision| {
            choose(&config(architecture, engine, precision), family, &cpu)
        };
        // The engines' own limits, for every text family.
        for (architecture, family) in [("bert", Family::Bert), ("llama", Family::Llama)] {
            assert!(choose_for(architecture, family, "native", "f16").is_err());
            assert!(choose_for(architecture, family, "candle", "int8").is_err());
            assert_eq!(
                choose_for(architecture, family, "candle", "auto").expect("auto"),
                (Engine::Candle, Precision::F32)
            );
        }
        // A decoder's own: no int8, no quantized products on the native engine.
        assert!(choose_for("llama", Family::Llama, "native", "int8").is_err());
        assert!(choose_for("llama", Family::Llama, "native", "quantized").is_err());
        assert_eq!(
            choose_for("bert", Family::Bert, "native", "int8").expect("int8"),
            (Engine::Native, Precision::Int8)
        );
        let vision = Family::Vision(super::super::catalog::ImageNetwork::Vgg16(
            VggFeatures::Pool5,
        ));
        assert_eq!(
            choose_for("vgg16", vision, "auto", "auto").expect("vision"),
            (Engine::Native, Precision::F32)
        );
    }
}
