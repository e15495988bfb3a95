//! The deploy checks: the container image (Dockerfile, build context), the
//! Kubernetes manifests (rendered, validated, and run as processes with their
//! probes and shutdown), and the monitoring (Prometheus rules and their unit
//! tests, the Grafana dashboard against the metrics the server declares).

// Helpers outside `#[test]` functions (`common`, `support`) unwrap too: a
// panic there fails the check that called them, with the message saying
// what was missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod support;

mod docker;
mod kubernetes;
mod monitoring;
