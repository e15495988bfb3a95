//! The use cases, whatever transport calls them: Embed, Predict, training-job
//! submission and dataset upload, and the catalog of backbones and heads.
//!
//! Nothing here knows protobuf: transports (src/server/) decode their wire
//! format into the request types below, call one method, and encode the
//! answer. Defaults and bounds of every request parameter live here.

mod answer_budget;
mod embed;
mod fine_tune;
mod heads;
mod inputs;
mod lookup;
mod predict;
mod scope;
mod training;

pub use answer_budget::{AnswerBudget, Unbudgeted};
pub use embed::{embed_options, EmbedRequest, EmbedResponse, Embedder, Embedding};
pub use fine_tune::{FineTuningOptions, LoraOptions, MethodOptions};
pub use heads::Catalog;
pub use inputs::{check_input, check_request_inputs, check_tensor_shape, MAX_TENSOR_RANK};
pub use predict::{LabelScore, PredictRequest, PredictResponse, Predictor};
pub use scope::Scope;
pub use training::{
    bounds, head_kind, training_params, HeadSpec, RawExample, TrainRequest, Trainer, TrainingData,
    TrainingOptions, Upload,
};
