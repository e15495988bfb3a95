//! Between the protobuf contract (src/proto.rs) and the core's types, in both
//! directions. Transports and the fuzz targets use it; nothing below it knows
//! protobuf.

pub mod convert;
pub mod field_count;
pub mod framing;
pub mod heads;
