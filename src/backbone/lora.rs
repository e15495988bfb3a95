//! Low-rank adapters (LoRA, Hu et al. 2021): a frozen dense layer `W` is used as
//! `W + scale · B·A`, with `A` `[rank, inputs]` and `B` `[outputs, rank]` the
//! only trained matrices and `scale = alpha / rank`, as the Python `peft`
//! package defines it. `B` starts at zero, so a new adapter changes nothing
//! until it is trained.

use candle_core::{DType, Device, Tensor, Var};

use crate::nn::rng::Rng;

/// The update of one dense layer: `x·Aᵀ·Bᵀ·scale` is added to its output.
pub struct LowRank {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl LowRank {
    /// A new adapter as `peft` initialises one: `A` from Kaiming-uniform
    /// bounds (`±sqrt(1 / inputs)` for its a = sqrt(5)), `B` zero; `A` drawn
    /// from `rng`, so a seed gives the same adapter everywhere.
    pub fn new(
        shape: (usize, usize),
        rank: usize,
        alpha: f64,
        rng: &mut Rng,
        (dtype, device): (DType, &Device),
    ) -> candle_core::Result<Self> {
        let (inputs, outputs) = shape;
        let bound = (1.0 / inputs as f64).sqrt() as f32;
        let a = Tensor::from_vec(
            rng.uniform(rank * inputs, -bound, bound),
            (rank, inputs),
            device,
        )?
        .to_dtype(dtype)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::zeros((outputs, rank), dtype, device)?,
            scale: alpha / rank as f64,
        })
    }

    /// `x`: `[tokens, inputs]` → the update `[tokens, outputs]`.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.a.as_tensor().t()?)?
            .matmul(&self.b.as_tensor().t()?)?
            * self.scale
    }

    /// `base` (the frozen layer's output for `x`) with this update added.
    pub fn apply(&self, x: &Tensor, base: Tensor) -> candle_core::Result<Tensor> {
        base + self.delta(x)?
    }

    pub fn vars(&self) -> [&Var; 2] {
        [&self.a, &self.b]
    }
}

/// The adapters of one encoder layer; `None` leaves a projection as it is.
#[derive(Default)]
pub struct LayerAdapters {
    pub query: Option<LowRank>,
    pub key: Option<LowRank>,
    pub value: Option<LowRank>,
    pub attention_output: Option<LowRank>,
    /// The feed-forward input (`intermediate.dense`).
    pub intermediate: Option<LowRank>,
    /// The feed-forward output (`output.dense`).
    pub output: Option<LowRank>,
}

impl LayerAdapters {
    /// The six slots, in the order of [`PEFT_MODULES`].
    fn slots(&self) -> [&Option<LowRank>; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    /// Every trained matrix of the layer.
    pub fn vars(&self) -> Vec<&Var> {
        self.slots()
            .into_iter()
            .flatten()
            .flat_map(LowRank::vars)
            .collect()
    }

    /// Whether any of query, key or value is adapted.
    pub fn adapts_attention_inputs(&self) -> bool {
        self.query.is_some() || self.key.is_some() || self.value.is_some()
    }
}

/// `base` plus `adapter`'s update for `x`, or `base` itself.
pub fn adapted(adapter: Option<&LowRank>, x: &Tensor, base: Tensor) -> candle_core::Result<Tensor> {
    match adapter {
        Some(adapter) => adapter.apply(x, base),
        None => Ok(base),
    }
}

/// How adapters were set up, as the Python `peft` package records it.
pub struct PeftSettings {
    pub rank: usize,
    pub alpha: f64,
    /// The encoder layer the first of the adapters belongs to.
    pub first_layer: usize,
}

/// The module path (under a Hugging Face `BertModel`) of each adapter slot,
/// in the order of [`LayerAdapters::slots`].
const PEFT_MODULES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// Writes `adapters` into `dir` as `peft` saves a LoRA adapter of a
/// `BertModel`: adapter_config.json, and adapter_model.safetensors with
/// `base_model.model.encoder.layer.{i}.{module}.lora_A.weight` (`[rank,
/// inputs]`) and `lora_B.weight` (`[outputs, rank]`) in f32. The targets are
/// one regular expression over the adapted modules' full names, since peft's
/// suffix matching cannot tell `attention.output.dense` from `output.dense`.
pub fn export_peft(
    adapters: &[LayerAdapters],
    settings: &PeftSettings,
    dir: &std::path::Path,
) -> crate::Result<()> {
    let mut tensors = std::collections::HashMap::new();
    let mut modules = Vec::new();
    for (offset, layer) in adapters.iter().enumerate() {
        let index = settings.first_layer + offset;
        for (module, slot) in PEFT_MODULES.iter().zip(layer.slots()) {
            let Some(adapter) = slot else { continue };
            let prefix = format!("base_model.model.encoder.layer.{index}.{module}");
            for (name, var) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
                let tensor = var
                    .as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                tensors.insert(format!("{prefix}.{name}.weight"), tensor);
            }
            modules.push(format!(
                "encoder\\.layer\\.{index}\\.{}",
                module.replace('.', "\\.")
            ));
        }
    }
    let storage = |err: std::io::Error| {
        crate::Error::Storage(format!(
            "cannot write the adapter to {}: {err}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(storage)?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": format!(".*({})", modules.join("|")),
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "modules_to_save": null,
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|err| crate::Error::Internal(format!("adapter_config.json: {err}")))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(storage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::{export_peft, LayerAdapters, LowRank, PeftSettings};
    use crate::nn::rng::Rng;

    /// The export holds peft's tensor names and shapes, and a config whose
    /// target expression names exactly the adapted modules.
    #[test]
    fn peft_export_uses_peft_names_shapes_and_targets() {
        let mut rng = Rng(1);
        let spec = (DType::F32, &Device::Cpu);
        let adapters = vec![LayerAdapters {
            query: Some(LowRank::new((16, 16), 4, 8.0, &mut rng, spec).expect("q")),
            output: Some(LowRank::new((32, 16), 4, 8.0, &mut rng, spec).expect("o")),
            ..LayerAdapters::default()
        }];
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = PeftSettings {
            rank: 4,
            alpha: 8.0,
            first_layer: 5,
        };
        export_peft(&adapters, &settings, dir.path()).expect("export");
        let tensors = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .expect("safetensors");
        let shape = |name: &str| tensors[name].dims().to_vec();
        let q = "base_model.model.encoder.layer.5.attention.self.query";
        let o = "base_model.model.encoder.layer.5.output.dense";
        assert_eq!(shape(&format!("{q}.lora_A.weight")), [4, 16]);
        assert_eq!(shape(&format!("{q}.lora_B.weight")), [16, 4]);
        assert_eq!(shape(&format!("{o}.lora_A.weight")), [4, 32]);
        assert_eq!(shape(&format!("{o}.lora_B.weight")), [16, 4]);
        assert_eq!(tensors.len(), 4);
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).expect("config"),
        )
        .expect("JSON");
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 4);
        assert_eq!(config["lora_alpha"], 8.0);
        let targets = regex_lite(config["target_modules"].as_str().expect("targets"));
        assert!(targets("encoder.layer.5.attention.self.query"));
        assert!(targets("encoder.layer.5.output.dense"));
        assert!(!targets("encoder.layer.5.attention.output.dense"));
        assert!(!targets("encoder.layer.4.attention.self.query"));
    }

    /// Whether a module name ends with one of the alternatives of `.*(a|b)`
    /// (the only shape export_peft writes), as peft's full match of the
    /// expression on the module's name decides: the name ends with an
    /// alternative at a dot or at its start.
    fn regex_lite(expression: &str) -> impl Fn(&str) -> bool {
        let inner = expression
            .strip_prefix(".*(")
            .and_then(|e| e.strip_suffix(')'))
            .expect("the shape export_peft writes");
        let alternatives: Vec<String> = inner.split('|').map(|a| a.replace("\\.", ".")).collect();
        move |name: &str| {
            alternatives
                .iter()
                .any(|a| name == a || name.ends_with(&format!(".{a}")))
        }
    }
}
