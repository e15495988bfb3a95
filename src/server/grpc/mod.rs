//! The gRPC transport: the tonic services, the one mapping of errors to
//! status codes, and the request layer around every call.

pub mod deadline;
pub mod embedder;
pub mod models;
pub mod predictor;
pub mod request_layer;
pub mod response_budget;
pub mod status;
pub mod trainer;
