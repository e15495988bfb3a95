//! tlserve: a gRPC server for transfer learning.
//!
//! Pretrained backbones are loaded once and stay resident; clients embed inputs
//! with them, train small heads on their features and predict with backbone + head.
//!
//! Data flows one way: [`server`] validates protobuf requests and converts them to
//! domain types, [`batching`] queues work per backbone and runs it on dedicated
//! threads, [`backbone`] runs the model, and results travel back through oneshot
//! channels. Nothing below `server` knows protobuf. [`head`] applies trained
//! heads to the features; backbones and heads share the numeric building blocks
//! of [`nn`], and every layer reads [`config`], which is plain data and imports
//! no domain module.

pub mod backbone;
pub mod batching;
pub mod bench;
pub mod client;
pub mod config;
pub mod core;
pub mod datasets;
pub mod error;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod head;
pub mod jobs;
pub mod loadgen;
pub mod metrics;
pub mod nn;
pub mod proto;
pub mod registry;
pub mod server;
pub mod sync;
pub mod task;
pub mod telemetry;
pub mod wire;

pub use error::{Error, Result};
