//! The integration tests: each module starts real `tlserve` servers on
//! loopback ports and talks to them as a client would (gRPC, gRPC-Web, the
//! HTTP API, the command line). One binary, so the crate and `common` are
//! compiled and linked once rather than once per file.
//!
//! Tests whose assertions bound a wall time hold `common::timing_sensitive()`
//! while they run, so no two of them share the cores.

// Helpers outside `#[test]` functions (`common`, fixtures) unwrap too: a
// panic there fails the test that called them, with the message saying what
// was missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod bad_inputs;
mod batching;
mod cli_workflow;
mod crash_safety;
mod decoder;
mod embed_reference;
mod fuzz_smoke;
mod hardening;
mod http_api;
mod lifecycle;
mod overload;
mod pytorch_legacy;
mod readme_examples;
mod replicas;
mod security;
mod server_errors;
mod storage;
mod training;
mod vision;
mod web_console;
