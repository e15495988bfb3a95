//! The deploy checks: the container image (Dockerfile, build context), the
//! Kubernetes manifests (rendered, validated, and run as processes with their
//! probes and shutdown), and the monitoring (Prometheus rules and their unit
//! tests, the Grafana dashboard against the metrics the server declares).

#[path = "../common/mod.rs"]
mod common;
mod support;

mod docker;
mod kubernetes;
mod monitoring;
