//! What the gRPC and HTTP transports share: tokens and roles, the Host and
//! Origin checks, the connections of every port and the bounds on request
//! bodies.

pub mod auth;
pub mod browser;
pub mod connections;
pub mod listener;
pub mod message_limit;
pub mod request_id;
