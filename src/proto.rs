//! Generated protobuf and gRPC code for the `tlserve.v1` contract in proto/.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tlserve.v1");

/// Encoded `FileDescriptorSet` of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tlserve_descriptor.bin"));
