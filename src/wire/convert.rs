//! Protobuf requests to the core's request types, and the core's answers back
//! to protobuf. Checks of a message's shape happen here; bounds and defaults
//! are the core's.

use std::time::Instant;

use crate::{
    backbone::{Input, Modality, Pooling},
    batching::Priority,
    core::{
        self, FineTuningOptions, HeadSpec, LoraOptions, MethodOptions, RawExample, TrainingData,
        TrainingOptions,
    },
    head::Solver,
    proto, Error, Result,
};

/// Converts the wire inputs, naming the index of the first malformed one.
pub fn inputs(inputs: Vec<proto::Input>) -> Result<Vec<Input>> {
    inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| input_of(index, input))
        .collect()
}

/// One wire input; `index` names it in the error.
pub fn input_of(index: usize, input: proto::Input) -> Result<Input> {
    decode_input(input).map_err(|reason| Error::InvalidInput { index, reason })
}

fn decode_input(input: proto::Input) -> std::result::Result<Input, String> {
    use proto::input::Kind;
    match input.kind {
        None => Err("no input set: give text, image or tensor".into()),
        Some(Kind::Text(text)) => Ok(Input::Text(text)),
        Some(Kind::Image(bytes)) => {
            if bytes.is_empty() {
                return Err("image is empty".into());
            }
            Ok(Input::Image(bytes))
        }
        Some(Kind::Tensor(tensor)) => {
            // Before the shape is widened: its rank is bounded.
            core::check_tensor_shape(&tensor.shape, tensor.values.len())?;
            let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
            if let Some(at) = tensor.values.iter().position(|v| !v.is_finite()) {
                return Err(format!("tensor value {at} is not a finite number"));
            }
            Ok(Input::Tensor {
                shape,
                values: tensor.values,
            })
        }
    }
}

/// The requested pooling; None: the backbone's default.
pub fn pooling_of(pooling: i32) -> Result<Option<Pooling>> {
    match proto::Pooling::try_from(pooling) {
        Ok(proto::Pooling::Unspecified) => Ok(None),
        Ok(proto::Pooling::Mean) => Ok(Some(Pooling::Mean)),
        Ok(proto::Pooling::Cls) => Ok(Some(Pooling::Cls)),
        Ok(proto::Pooling::LastToken) => Ok(Some(Pooling::LastToken)),
        Ok(proto::Pooling::WeightedMean) => Ok(Some(Pooling::WeightedMean)),
        Err(_) => Err(Error::InvalidArgument(format!(
            "pooling {pooling} is not a known value"
        ))),
    }
}

/// A scheduling class as the wire spells it.
pub fn priority(priority: Priority) -> proto::Priority {
    match priority {
        Priority::Online => proto::Priority::Online,
        Priority::Bulk => proto::Priority::Bulk,
    }
}

/// The request's scheduling class; unspecified means online.
pub fn priority_of(value: i32) -> Result<Priority> {
    match proto::Priority::try_from(value) {
        Ok(proto::Priority::Unspecified | proto::Priority::Online) => Ok(Priority::Online),
        Ok(proto::Priority::Bulk) => Ok(Priority::Bulk),
        Err(_) => Err(Error::InvalidArgument(format!(
            "priority {value} is not a known value"
        ))),
    }
}

pub fn modality(modality: Modality) -> proto::Modality {
    match modality {
        Modality::Text => proto::Modality::Text,
        Modality::Image => proto::Modality::Image,
    }
}

pub fn pooling(pooling: Pooling) -> proto::Pooling {
    match pooling {
        Pooling::Mean => proto::Pooling::Mean,
        Pooling::Cls => proto::Pooling::Cls,
        Pooling::LastToken => proto::Pooling::LastToken,
        Pooling::WeightedMean => proto::Pooling::WeightedMean,
    }
}

pub fn embed_request(
    request: proto::EmbedRequest,
    deadline: Option<Instant>,
) -> Result<core::EmbedRequest> {
    Ok(core::EmbedRequest {
        priority: priority_of(request.priority)?,
        pooling: pooling_of(request.pooling)?,
        inputs: inputs(request.inputs)?,
        backbone: request.backbone,
        normalize: request.normalize,
        truncate: request.truncate,
        dimensions: None,
        deadline,
        head: (!request.head.is_empty()).then_some(request.head),
    })
}

pub fn embed_response(response: core::EmbedResponse) -> proto::EmbedResponse {
    proto::EmbedResponse {
        backbone: response.backbone,
        dimension: response.dimension as u32,
        embeddings: response
            .embeddings
            .into_iter()
            .map(|e| proto::Embedding {
                values: e.values,
                tokens: e.tokens,
                truncated: e.truncated,
            })
            .collect(),
    }
}

pub fn predict_request(
    request: proto::PredictRequest,
    deadline: Option<Instant>,
) -> Result<core::PredictRequest> {
    Ok(core::PredictRequest {
        priority: priority_of(request.priority)?,
        inputs: inputs(request.inputs)?,
        head: request.head,
        truncate: request.truncate,
        top_k: request.top_k as usize,
        deadline,
    })
}

pub fn predict_response(response: core::PredictResponse) -> proto::PredictResponse {
    proto::PredictResponse {
        head: response.head,
        version: response.version,
        predictions: response
            .predictions
            .into_iter()
            .map(|labels| proto::Prediction {
                labels: labels
                    .into_iter()
                    .map(|l| proto::LabelScore {
                        label: l.label,
                        index: l.index,
                        probability: l.probability,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Examples as they arrived; an input that cannot be decoded is carried as
/// its reason, for the core to report with the example's index.
pub fn raw_examples(examples: Vec<proto::Example>) -> Vec<RawExample> {
    examples
        .into_iter()
        .map(|example| RawExample {
            input: decode_input(example.input.unwrap_or_default()),
            label: example.label,
        })
        .collect()
}

/// Zero on the wire means "not set": the default applies.
fn set<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// A solver as the wire spells it.
pub fn solver(solver: Solver) -> proto::Solver {
    match solver {
        Solver::Lbfgs => proto::Solver::Lbfgs,
        Solver::Adamw => proto::Solver::Adamw,
    }
}

/// The requested solver; None: the core picks.
pub fn solver_of(solver: i32) -> Result<Option<Solver>> {
    match proto::Solver::try_from(solver) {
        Ok(proto::Solver::Unspecified) => Ok(None),
        Ok(proto::Solver::Lbfgs) => Ok(Some(Solver::Lbfgs)),
        Ok(proto::Solver::Adamw) => Ok(Some(Solver::Adamw)),
        Err(_) => Err(Error::InvalidArgument(format!(
            "solver {solver} is not a known value"
        ))),
    }
}

pub fn training_options(config: proto::TrainingConfig) -> Result<TrainingOptions> {
    Ok(TrainingOptions {
        solver: solver_of(config.solver)?,
        epochs: set(config.epochs).map(|v| v as usize),
        learning_rate: set(config.learning_rate).map(f64::from),
        batch_size: set(config.batch_size).map(|v| v as usize),
        weight_decay: set(config.weight_decay).map(f64::from),
        validation_fraction: set(config.validation_fraction).map(f64::from),
        no_validation: config.no_validation,
        early_stopping_patience: set(config.early_stopping_patience).map(|v| v as usize),
        l2: set(config.l2).map(f64::from),
        cv_folds: set(config.cv_folds).map(|v| v as usize),
        balance_classes: config.balance_classes,
        seed: config.seed,
        unfreeze_top_layers: config.unfreeze_top_layers as usize,
        fine_tuning: config.fine_tuning.map(fine_tuning_options).transpose()?,
    })
}

fn fine_tuning_options(tuning: proto::FineTuning) -> Result<FineTuningOptions> {
    use proto::fine_tuning::Method;
    let method = match tuning.method {
        Some(Method::Lora(lora)) => MethodOptions::Lora(LoraOptions {
            layers: set(lora.layers).map(|v| v as usize),
            rank: set(lora.rank).map(|v| v as usize),
            alpha: set(lora.alpha).map(f64::from),
            dropout: set(lora.dropout).map(f64::from),
            targets: lora.targets,
        }),
        Some(Method::TopLayers(top)) => MethodOptions::TopLayers {
            layers: set(top.layers).map(|v| v as usize),
        },
        None => {
            return Err(Error::InvalidArgument(
                "fine_tuning.method is unset: set fine_tuning.lora or fine_tuning.top_layers"
                    .into(),
            ))
        }
    };
    Ok(FineTuningOptions {
        method,
        backbone_learning_rate: set(tuning.backbone_learning_rate).map(f64::from),
        warmup_fraction: tuning.warmup_fraction.map(f64::from),
    })
}

fn head_spec(spec: Option<proto::HeadSpec>) -> Option<HeadSpec> {
    use proto::head_spec::Kind;
    match spec.and_then(|s| s.kind)? {
        Kind::Linear(_) => Some(HeadSpec::Linear),
        Kind::Mlp(mlp) => Some(HeadSpec::Mlp {
            hidden_size: set(mlp.hidden_size).map(|v| v as usize),
            dropout: mlp.dropout,
        }),
    }
}

pub fn train_request(request: proto::TrainHeadRequest) -> Result<core::TrainRequest> {
    use proto::train_head_request::Data;
    Ok(core::TrainRequest {
        backbone: request.backbone,
        head_name: request.head_name,
        head: head_spec(request.spec),
        options: training_options(request.training.unwrap_or_default())?,
        data: request.data.map(|data| match data {
            Data::Examples(set) => TrainingData::Examples(raw_examples(set.examples)),
            Data::DatasetId(id) => TrainingData::Dataset(id),
        }),
        labels: request.labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::input::Kind;

    fn tensor(shape: Vec<u32>, values: Vec<f32>) -> proto::Input {
        proto::Input {
            kind: Some(Kind::Tensor(proto::Tensor { shape, values })),
        }
    }

    fn text(s: &str) -> proto::Input {
        proto::Input {
            kind: Some(Kind::Text(s.into())),
        }
    }

    #[test]
    fn malformed_items_are_named_by_index() {
        let cases = [
            proto::Input { kind: None },
            proto::Input {
                kind: Some(Kind::Image(vec![])),
            },
            tensor(vec![2, 2], vec![1.0; 3]),
            tensor(vec![], vec![]),
            tensor(vec![u32::MAX, u32::MAX, u32::MAX], vec![]),
            tensor(vec![1; 100_000], vec![1.0]),
            tensor(vec![0], vec![]),
            tensor(vec![2], vec![1.0, f32::NAN]),
        ];
        for case in cases {
            let err = inputs(vec![text("fine"), case.clone()]).unwrap_err();
            assert!(
                matches!(err, Error::InvalidInput { index: 1, .. }),
                "{case:?} gave {err}"
            );
        }
        assert!(inputs(vec![tensor(vec![2, 1], vec![0.5, 1.5])]).is_ok());
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        assert_eq!(priority_of(0).unwrap(), Priority::Online);
        assert_eq!(priority_of(2).unwrap(), Priority::Bulk);
        assert!(priority_of(42).is_err());
        assert_eq!(pooling_of(0).unwrap(), None);
        assert!(pooling_of(99).is_err());
    }

    #[test]
    fn zero_training_fields_take_the_defaults() {
        let options = training_options(proto::TrainingConfig::default()).unwrap();
        assert_eq!(options, TrainingOptions::default());
        let params = core::training_params(&options, &crate::head::HeadKind::Linear).unwrap();
        assert_eq!(params, crate::head::TrainingParams::default());
        let unknown = proto::TrainingConfig {
            solver: 42,
            ..Default::default()
        };
        assert!(training_options(unknown).is_err());
    }
}
