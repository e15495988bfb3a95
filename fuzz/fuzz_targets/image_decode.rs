#![no_main]
//! Encoded images through decoding (limits, EXIF, RGB) and preprocessing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tlserve::fuzz_targets::image_decode(data);
});
