//! Times head training alone (no embedding, no server) on synthetic features
//! shaped like sentence embeddings, for set sizes a 2-core machine cannot
//! embed in a benchmark's minutes: unit vectors of `--dim` values drawn
//! around `--classes` random centres, with enough noise that the classes
//! overlap heavily (about 40% accuracy at 20 classes and 20,000 examples:
//! a hard problem, the slow case for the solver). Trains the default head (L-BFGS, penalty by 5-fold
//! cross-validation, refit) and prints one JSON line per size.
//!
//! ```sh
//! cargo run --release --example bench_heads -- --sizes 1000,5000,20000,50000 --dim 384 --classes 20
//! ```

use std::time::Instant;

use tlserve::head::{
    train::{train, TrainingSet},
    HeadKind, TrainingParams,
};
use tokio_util::sync::CancellationToken;

/// SplitMix64, with Box-Muller normals.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// `n` examples around `classes` centres in `dim` dimensions.
fn synthetic(n: usize, dim: usize, classes: usize, seed: u64) -> TrainingSet {
    let mut draw = Draw(seed);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| unit((0..dim).map(|_| draw.normal()).collect()))
        .collect();
    let mut features = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % classes;
        // Noise of norm about 12 around unit centres about 1.4 apart: about
        // 0.6 along any one direction, so that the classes overlap heavily.
        let scale = 12.0 / (dim as f32).sqrt();
        let point: Vec<f32> = centres[class]
            .iter()
            .map(|c| c + scale * draw.normal())
            .collect();
        features.extend(unit(point));
        labels.push(class as u32);
    }
    TrainingSet::new(features, dim, labels, classes)
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = arg(&args, "--sizes", "1000,5000,20000,50000")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let dim: usize = arg(&args, "--dim", "384").parse()?;
    let classes: usize = arg(&args, "--classes", "20").parse()?;
    for n in sizes {
        let set = synthetic(n, dim, classes, 1);
        let mut steps = 0;
        let start = Instant::now();
        let head = train(
            &set,
            &HeadKind::Linear,
            &TrainingParams::default(),
            &CancellationToken::new(),
            &mut |_, _| steps += 1,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "examples": n,
                "dim": dim,
                "classes": classes,
                "seconds": seconds,
                "steps": steps,
                "l2": head.params.l2,
                "cv_folds": head.params.cv_folds,
                "validation_accuracy": head.metrics.validation_accuracy,
                "threads": rayon::current_num_threads(),
            })
        );
    }
    Ok(())
}
