#![no_main]
//! Wire-format requests (Embed, Predict, TrainHead) and config text through the
//! server's decoding and validation.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tlserve::fuzz_targets::request_convert(data);
});
