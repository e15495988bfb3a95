//! tlserve: a gRPC server for transfer learning.
//!
//! Pretrained backbones are loaded once and stay resident; clients embed inputs
//! with them, train small heads on their features and predict with backbone + head.
//!
//! Data flows one way: a transport ([`server`]) decodes a request through
//! [`wire`] into the [`core`]'s types and calls one use case; the core queues
//! the inputs on the backbone's [`batching`] queue; a worker thread runs the
//! [`backbone`] on a whole batch; vectors come back through oneshot channels;
//! the core applies a [`head`] and the transport encodes the answer. Nothing
//! below `wire` knows protobuf.
//!
//! ## Layers
//!
//! From the top. A module may import modules of its own layer and of layers
//! below it, never above; tests/architecture.rs reads src/ and holds the code
//! to this list, and docs/ARCHITECTURE.md shows the same one.
//!
//! ```text
//! client, loadgen, bench, fuzz_targets | tools: the CLI's client verbs, load generator, in-process benchmark, fuzz entry points
//! server | transports: gRPC (tonic services, health, reflection) and gRPC-Web, the HTTP port (OpenAI-compatible API, console); auth, limits, connections; errors become codes and statuses
//! app | the composition root: the shared store, head store, datasets, jobs, registry and use cases, built from the config once at start-up for the transports
//! wire | protobuf messages to and from the core's types
//! proto | the generated `tlserve.v1` contract
//! core | the use cases: embed, predict, training-job submission, dataset upload, the catalog
//! jobs | training-job lifecycle and its records in the shared store
//! datasets | training sets in the shared store: uploads waiting for a job, every job's examples
//! registry | the configured backbones, resident, each with its queue
//! fine_tune | training a backbone's top layers with a head (LoRA or in full): the loop, its cache of frozen bottoms
//! head | head models, their training, the head store on the shared store, the records of fine-tuned heads
//! batching | one bounded queue per backbone, batch formation, worker threads
//! backbone | trait Backbone, the catalog of architectures, a folder per family (bert, llama, vision), text and weight-file support; the only layer that knows tensor layouts
//! nn | numeric building blocks shared by backbones and heads; f32, bf16 and int8 dense layers with CPU kernels chosen at run time
//! metrics, telemetry | every metric name and the exporter; logging
//! storage | the store replicas share: a volume or S3-compatible object storage, with atomic creates
//! fsutil, task, sync, clock | durable writes, blocking work off the runtime, locks, the wall clock of shared records
//! config | plain data: the configuration, parsed and validated at start-up
//! error | the one error type
//! ```

pub mod app;
pub mod backbone;
pub mod batching;
pub mod bench;
pub mod client;
pub mod clock;
pub mod config;
pub mod core;
pub mod datasets;
pub mod error;
pub mod fine_tune;
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
pub mod storage;
pub mod sync;
pub mod task;
pub mod telemetry;
pub mod wire;

pub use error::{Error, Result};
