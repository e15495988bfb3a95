//! The legacy PyTorch reader and `tlserve convert` on the real EfficientNet-Lite0
//! ImageNet weights, against an independent numpy + pickle reader
//! (tests/reference/legacy_pth_reference.py).
//!
//! Tolerance: shapes and dtypes must match exactly; the first values and the
//! per-tensor sums and sums of squares (float64 on both sides, over the same
//! float32 values in the same order) within 1e-9 relative, which leaves room only
//! for the JSON round trip of the reference's numbers.

use crate::common;

use std::{collections::HashMap, path::PathBuf, process::Command};

use common::*;
use tlserve::backbone::weights::pytorch_legacy;

fn lite0_dir() -> PathBuf {
    let dir = repo_root().join("models/efficientnet-lite0");
    assert!(
        dir.join("efficientnet-lite0.pth").is_file(),
        "the real EfficientNet-Lite0 weights are missing at {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn legacy_weights_match_an_independent_reader() {
    let pth = lite0_dir().join("efficientnet-lite0.pth");
    let output = Command::new(python())
        .arg(repo_file("tests/reference/legacy_pth_reference.py"))
        .arg(&pth)
        .output()
        .expect("run the reference reader");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("reference JSON");

    let tensors = pytorch_legacy::read(&pth).expect("read the legacy file");
    assert_eq!(tensors.len(), 296);
    assert_eq!(tensors.len(), reference.len());
    for (name, tensor) in &tensors {
        let expected = &reference[name];
        let shape: Vec<usize> = serde_json::from_value(expected["shape"].clone()).unwrap();
        assert_eq!(tensor.dims(), shape.as_slice(), "{name}: shape");
        let values: Vec<f64> = tensor
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .and_then(|t| t.to_vec1())
            .expect("values");
        let first: Vec<f64> = serde_json::from_value(expected["first"].clone()).unwrap();
        for (got, want) in values.iter().zip(&first) {
            assert!(close(*got, *want), "{name}: first values {got} vs {want}");
        }
        let sum: f64 = values.iter().sum();
        let sum_sq: f64 = values.iter().map(|v| v * v).sum();
        assert!(close(sum, expected["sum"].as_f64().unwrap()), "{name}: sum");
        assert!(
            close(sum_sq, expected["sum_sq"].as_f64().unwrap()),
            "{name}: sum of squares"
        );
        let dtype = expected["dtype"].as_str().unwrap();
        assert_eq!(
            format!("{:?}", tensor.dtype()).to_lowercase(),
            match dtype {
                "float32" => "f32",
                "int64" => "i64",
                other => other,
            },
            "{name}: dtype"
        );
    }
    // The file's layout names (lukemelas-style), BatchNorm statistics included.
    for name in [
        "_conv_stem.weight",
        "_bn0.running_mean",
        "_blocks.0._depthwise_conv.weight",
        "_conv_head.weight",
        "_fc.weight",
        "_fc.bias",
    ] {
        assert!(tensors.iter().any(|(n, _)| n == name), "missing {name}");
    }
}

#[test]
fn convert_writes_safetensors_with_the_same_tensors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("lite0.safetensors");
    let pth = lite0_dir().join("efficientnet-lite0.pth");
    let status = Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args(["convert", "--legacy-pth"])
        .arg(&pth)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run tlserve convert");
    assert!(status.success());
    let written = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).expect("load");
    let read = pytorch_legacy::read(&pth).expect("read");
    assert_eq!(written.len(), read.len());
    for (name, tensor) in read {
        let other = &written[&name];
        assert_eq!(other.dims(), tensor.dims(), "{name}");
        let diff = (other.to_dtype(candle_core::DType::F64).unwrap()
            - tensor.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert_eq!(diff, 0.0, "{name} changed in conversion");
    }
    // The fetch script installs the same bytes.
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(lite0_dir().join("model.safetensors")).unwrap()
    );
}
