#![no_main]
//! Request bodies through the gRPC message-framing scanner: oversized,
//! stalled and split messages.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tlserve::fuzz_targets::message_frames(data);
});
