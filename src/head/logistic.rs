//! Linear heads as softmax regression solved to convergence: the convex
//! problem
//!
//! ```text
//! minimise  sum_i s_i CE(softmax(W x_i + b), y_i) / sum_i s_i  +  l2 / 2 * |W|^2
//! ```
//!
//! (`s_i` the class weight of example i, the bias unpenalised) by full-batch
//! L-BFGS on the cached features. With no `l2` given, the penalty is chosen
//! by stratified k-fold cross-validation along a path of strengths (strong
//! to weak, each fit warm-started from the previous one, the path cut short
//! once the out-of-fold accuracy and log-loss stop improving), then the head
//! is refit on every example (the best out-of-fold accuracy chooses, the log-loss breaks
//! ties). Penalties follow scikit-learn's convention `l2 = 1 / (C *
//! sum_i s_i)`: a value of C means the same on a fold and on the whole set.
//! The out-of-fold predictions give the validation metrics, the expected
//! calibration error, and the temperature (when it helps).

use std::ops::Range;

use gemm::Parallelism;
use tokio_util::sync::CancellationToken;

use super::{
    calibration::{Calibration, Scores},
    lbfgs::{self, Minimum},
    model::HeadWeights,
    train::{TrainedHead, TrainingSet},
    HeadMetrics, TrainingParams,
};
use crate::{
    nn::{rng::Rng, Dense},
    Error, Result,
};

/// The inverse strengths `C` tried, strongest penalty first: 10^-3 .. 10^4
/// in half decades (scikit-learn's LogisticRegressionCV spans 10^-4 .. 10^4
/// in 10 steps).
fn c_grid() -> Vec<f64> {
    (0..=14)
        .map(|i| 10f64.powf(-3.0 + 0.5 * f64::from(i)))
        .collect()
}

/// Path points without a better out-of-fold loss before the path stops.
const PATH_PATIENCE: usize = 3;

/// Gradient tolerance of the fold fits: choosing a penalty needs less
/// precision than the published head (scikit-learn stops all its fits here).
const CV_TOLERANCE: f64 = 1e-4;

/// Gradient tolerance of the refit, whose weights are published.
const REFIT_TOLERANCE: f64 = 1e-5;

/// Rows per matrix product: bounds the scratch memory of a step.
const CHUNK: usize = 2048;

/// The logit given to a label that has no example at all: far below every
/// learned one, so that it is never predicted.
const UNSEEN_MARGIN: f64 = 30.0;

/// Progress steps of an L-BFGS run: the path (or one fixed penalty) under
/// cross-validation, then the refit.
pub fn planned_steps(params: &TrainingParams) -> usize {
    match (params.cv_folds, params.l2 > 0.0) {
        (0, _) => 1,
        (_, true) => 2,
        (_, false) => c_grid().len() + 1,
    }
}

/// The examples in fold order: fold f holds rows `bounds[f]..bounds[f + 1]`.
struct Folded {
    x: Vec<f32>,
    labels: Vec<u32>,
    /// Each row's class weight.
    weights: Vec<f64>,
    bounds: Vec<usize>,
    dim: usize,
    classes: usize,
}

impl Folded {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn fold(&self, f: usize) -> Range<usize> {
        self.bounds[f]..self.bounds[f + 1]
    }

    /// Every row but fold f's.
    fn without(&self, f: usize) -> Vec<Range<usize>> {
        vec![0..self.bounds[f], self.bounds[f + 1]..self.len()]
    }

    fn all(&self) -> Vec<Range<usize>> {
        std::iter::once(0..self.len()).collect()
    }
}

/// Assigns each example to one of `folds` folds, each label spread evenly
/// (stratified), in an order drawn from `rng`.
fn assign_folds(set: &TrainingSet, folds: usize, rng: &mut Rng) -> Vec<usize> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); set.classes];
    for (i, &y) in set.labels.iter().enumerate() {
        by_class[y as usize].push(i);
    }
    let mut fold_of = vec![0; set.len()];
    // Continuing the count across labels keeps the folds' sizes even.
    let mut next = 0;
    for rows in &mut by_class {
        rng.shuffle(rows);
        for &i in rows.iter() {
            fold_of[i] = next % folds;
            next += 1;
        }
    }
    fold_of
}

/// The set reordered fold by fold, with class weights.
fn fold_order(set: &TrainingSet, folds: usize, balance: bool, rng: &mut Rng) -> Folded {
    let fold_of = assign_folds(set, folds.max(1), rng);
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by_key(|&i| (fold_of[i], i));
    let class_weight = class_weights(set, balance);
    let mut x = Vec::with_capacity(set.features.len());
    for &i in &order {
        x.extend_from_slice(&set.features[i * set.dim..(i + 1) * set.dim]);
    }
    let mut bounds = vec![0; folds.max(1) + 1];
    for &i in &order {
        bounds[fold_of[i] + 1] += 1;
    }
    for f in 1..bounds.len() {
        bounds[f] += bounds[f - 1];
    }
    Folded {
        x,
        labels: order.iter().map(|&i| set.labels[i]).collect(),
        weights: order
            .iter()
            .map(|&i| class_weight[set.labels[i] as usize])
            .collect(),
        bounds,
        dim: set.dim,
        classes: set.classes,
    }
}

/// Inverse class frequency when `balance` (scikit-learn's "balanced"), else 1.
fn class_weights(set: &TrainingSet, balance: bool) -> Vec<f64> {
    let mut counts = vec![0usize; set.classes];
    for &y in &set.labels {
        counts[y as usize] += 1;
    }
    let present = counts.iter().filter(|&&c| c > 0).count().max(1);
    counts
        .iter()
        .map(|&c| {
            if balance && c > 0 {
                set.len() as f64 / (present as f64 * c as f64)
            } else {
                1.0
            }
        })
        .collect()
}

fn parallelism(work: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    // Threads cost more than they save on small products.
    if threads > 1 && work >= 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `x W^T`: `x` is `[rows, dim]`, `w` `[classes, dim]`; the result `[rows, classes]`.
fn x_wt(x: &[f32], w: &[f32], dim: usize, classes: usize) -> Vec<f32> {
    let rows = x.len() / dim;
    let mut out = vec![0f32; rows * classes];
    // SAFETY: `out` is [rows, classes] row-major (column stride 1, row stride
    // `classes`), `x` [rows, dim] row-major, and `w` [classes, dim] row-major
    // read as its transpose [dim, classes] (column stride `dim`, row stride
    // 1); every pointer covers exactly the elements those strides reach.
    unsafe {
        gemm::gemm(
            rows,
            classes,
            dim,
            out.as_mut_ptr(),
            1,
            classes as isize,
            false,
            x.as_ptr(),
            1,
            dim as isize,
            w.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(rows * dim * classes),
        );
    }
    out
}

/// `g += r^T x`: `r` is `[rows, classes]`, `x` `[rows, dim]`, `g` `[classes, dim]`.
fn add_rt_x(r: &[f32], x: &[f32], g: &mut [f32], dim: usize, classes: usize) {
    let rows = x.len() / dim;
    // SAFETY: `g` is [classes, dim] row-major (column stride 1, row stride
    // `dim`); `r` [rows, classes] row-major read as its transpose [classes,
    // rows] (column stride `classes`, row stride 1); `x` [rows, dim]
    // row-major. The sizes match the slices' lengths.
    unsafe {
        gemm::gemm(
            classes,
            dim,
            rows,
            g.as_mut_ptr(),
            1,
            dim as isize,
            true,
            r.as_ptr(),
            classes as isize,
            1,
            x.as_ptr(),
            1,
            dim as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(rows * dim * classes),
        );
    }
}

/// The penalised, weighted cross-entropy on some rows of the folded set.
/// Parameters are `W` (`[classes, dim]`, row-major) then `b`. A class with
/// no weight in these rows takes no part: its logit is minus infinity.
struct Problem<'a> {
    data: &'a Folded,
    rows: Vec<Range<usize>>,
    active: Vec<bool>,
    weight_sum: f64,
    l2: f64,
}

impl<'a> Problem<'a> {
    /// The problem on `rows` with the penalty of inverse strength `c`.
    fn new(data: &'a Folded, rows: Vec<Range<usize>>, c: f64) -> Self {
        let mut active = vec![false; data.classes];
        let mut weight_sum = 0.0;
        for i in rows.iter().flat_map(|r| r.clone()) {
            active[data.labels[i] as usize] |= data.weights[i] > 0.0;
            weight_sum += data.weights[i];
        }
        Self {
            data,
            rows,
            active,
            weight_sum,
            l2: 1.0 / (c * weight_sum),
        }
    }

    fn parameters(&self) -> usize {
        self.data.classes * (self.data.dim + 1)
    }

    /// Logits of `range` with the bias added; minus infinity for inactive classes.
    fn logits(&self, theta: &[f64], range: Range<usize>) -> Vec<f32> {
        let (k, d) = (self.data.classes, self.data.dim);
        let (w, b) = theta.split_at(k * d);
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut z = x_wt(&self.data.x[range.start * d..range.end * d], &w32, d, k);
        for row in z.chunks_exact_mut(k) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = if self.active[j] {
                    (f64::from(*v) + b[j]) as f32
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        z
    }

    /// The objective's value at `theta`, its gradient written to `gradient`.
    fn evaluate(&self, theta: &[f64], gradient: &mut [f64]) -> f64 {
        let (k, d) = (self.data.classes, self.data.dim);
        let (w, b) = theta.split_at(k * d);
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut grad_w = vec![0f32; k * d];
        let mut grad_b = vec![0f64; k];
        let mut loss = 0.0;
        for range in &self.rows {
            for start in range.clone().step_by(CHUNK) {
                let end = (start + CHUNK).min(range.end);
                let x = &self.data.x[start * d..end * d];
                // The logits become the residuals s_i (p_i - onehot(y_i)) / S.
                let mut z = x_wt(x, &w32, d, k);
                for (r, row) in z.chunks_exact_mut(k).enumerate() {
                    let i = start + r;
                    let scale = self.data.weights[i] / self.weight_sum;
                    let y = self.data.labels[i] as usize;
                    loss += scale * self.residual(row, b, y, scale, &mut grad_b);
                }
                add_rt_x(&z, x, &mut grad_w, d, k);
            }
        }
        let (gw, gb) = gradient.split_at_mut(k * d);
        let mut penalty = 0.0;
        for ((g, &r), &wv) in gw.iter_mut().zip(&grad_w).zip(w) {
            *g = f64::from(r) + self.l2 * wv;
            penalty += wv * wv;
        }
        gb.copy_from_slice(&grad_b);
        loss + 0.5 * self.l2 * penalty
    }

    /// Turns one row of logits into its residual `scale * (p - onehot(y))`,
    /// adds it to the bias gradient, and returns the row's cross-entropy.
    fn residual(
        &self,
        row: &mut [f32],
        b: &[f64],
        y: usize,
        scale: f64,
        grad_b: &mut [f64],
    ) -> f64 {
        let mut max = f64::NEG_INFINITY;
        for (j, v) in row.iter().enumerate() {
            if self.active[j] {
                max = max.max(f64::from(*v) + b[j]);
            }
        }
        let mut sum = 0.0;
        for (j, v) in row.iter().enumerate() {
            if self.active[j] {
                sum += (f64::from(*v) + b[j] - max).exp();
            }
        }
        let log_sum = max + sum.ln();
        let loss = log_sum - (f64::from(row[y]) + b[y]);
        for (j, v) in row.iter_mut().enumerate() {
            let p = if self.active[j] {
                (f64::from(*v) + b[j] - log_sum).exp()
            } else {
                0.0
            };
            let r = scale * (p - f64::from(u8::from(j == y)));
            grad_b[j] += r;
            *v = r as f32;
        }
        loss
    }

    /// Minimises from `init` with L-BFGS, to `gradient_tolerance`.
    fn solve(
        &self,
        init: Vec<f64>,
        gradient_tolerance: f64,
        cancel: &CancellationToken,
    ) -> Result<Minimum> {
        let mut objective =
            |theta: &[f64], gradient: &mut [f64]| Ok(self.evaluate(theta, gradient));
        let options = lbfgs::Options {
            gradient_tolerance,
            ..lbfgs::Options::default()
        };
        lbfgs::minimize(&mut objective, init, &options, cancel)
    }

    /// Plain mean cross-entropy and accuracy of `theta` on its own rows.
    fn fit_metrics(&self, theta: &[f64]) -> (f64, f64) {
        let mut loss = 0.0;
        let mut correct = 0usize;
        let mut count = 0usize;
        for range in &self.rows {
            for start in range.clone().step_by(CHUNK) {
                let end = (start + CHUNK).min(range.end);
                let z = self.logits(theta, start..end);
                let labels = &self.data.labels[start..end];
                let scores = Scores {
                    logits: &z,
                    classes: self.data.classes,
                    labels,
                };
                let c = scores.summary();
                loss += c.loss * labels.len() as f64;
                correct += (c.accuracy * labels.len() as f64).round() as usize;
                count += labels.len();
            }
        }
        (
            loss / count.max(1) as f64,
            correct as f64 / count.max(1) as f64,
        )
    }
}

/// The cross-validation at one penalty: each fold's solution (the next
/// point's warm start), the out-of-fold logits in fold order, and the mean
/// training loss and accuracy of the fold models.
struct PathPoint {
    c: f64,
    thetas: Vec<Vec<f64>>,
    oof: Vec<f32>,
    train: (f64, f64),
}

/// Fits every fold at inverse strength `c`, warm-started from `thetas`.
fn cross_validate(
    data: &Folded,
    c: f64,
    thetas: &[Vec<f64>],
    cancel: &CancellationToken,
) -> Result<PathPoint> {
    let folds = data.bounds.len() - 1;
    let mut oof = Vec::with_capacity(data.len() * data.classes);
    let mut solved = Vec::with_capacity(folds);
    let (mut loss, mut accuracy) = (0.0, 0.0);
    for (f, init) in thetas.iter().enumerate() {
        let problem = Problem::new(data, data.without(f), c);
        let theta = problem.solve(init.clone(), CV_TOLERANCE, cancel)?.x;
        let (l, a) = problem.fit_metrics(&theta);
        loss += l / folds as f64;
        accuracy += a / folds as f64;
        oof.extend(problem.logits(&theta, data.fold(f)));
        solved.push(theta);
    }
    Ok(PathPoint {
        c,
        thetas: solved,
        oof,
        train: (loss, accuracy),
    })
}

/// The out-of-fold predictions of a path point, uncalibrated.
fn oof_summary(data: &Folded, point: &PathPoint) -> Calibration {
    Scores {
        logits: &point.oof,
        classes: data.classes,
        labels: &data.labels,
    }
    .summary()
}

/// Reports one step: the fold models' training metrics and the out-of-fold ones.
fn report(
    step: usize,
    point: &PathPoint,
    summary: &Calibration,
    planned: usize,
    on_step: &mut dyn FnMut(&HeadMetrics, usize),
) {
    on_step(
        &HeadMetrics {
            epoch: step,
            train_loss: point.train.0 as f32,
            train_accuracy: point.train.1 as f32,
            validation_loss: Some(summary.loss as f32),
            validation_accuracy: Some(summary.accuracy as f32),
            ..HeadMetrics::default()
        },
        planned,
    );
}

/// Walks the penalty path (or the one given penalty) under cross-validation
/// and returns the point with the best out-of-fold accuracy (the lower
/// log-loss between equals), and the number of steps taken. Accuracy is
/// what a classifier is judged by; its confidence is the temperature's
/// business. The path stops once neither figure has improved for
/// [`PATH_PATIENCE`] points.
fn choose_penalty(
    data: &Folded,
    grid: &[f64],
    planned: usize,
    cancel: &CancellationToken,
    on_step: &mut dyn FnMut(&HeadMetrics, usize),
) -> Result<(PathPoint, usize)> {
    let folds = data.bounds.len() - 1;
    let zeros = vec![0.0; data.classes * (data.dim + 1)];
    let mut thetas = vec![zeros; folds];
    let mut best: Option<(Calibration, PathPoint)> = None;
    let (mut best_accuracy, mut best_loss) = (f64::NEG_INFINITY, f64::INFINITY);
    let mut since_improvement = 0;
    let mut steps = 0;
    for &c in grid {
        let point = cross_validate(data, c, &thetas, cancel)?;
        steps += 1;
        let summary = oof_summary(data, &point);
        report(steps, &point, &summary, planned, on_step);
        thetas.clone_from(&point.thetas);
        let better = best.as_ref().is_none_or(|(b, _)| {
            summary.accuracy > b.accuracy
                || (summary.accuracy == b.accuracy && summary.loss < b.loss)
        });
        let improved = summary.accuracy > best_accuracy || summary.loss < best_loss;
        best_accuracy = best_accuracy.max(summary.accuracy);
        best_loss = best_loss.min(summary.loss);
        if better {
            best = Some((summary, point));
        }
        since_improvement = if improved { 0 } else { since_improvement + 1 };
        if since_improvement >= PATH_PATIENCE {
            break;
        }
    }
    let (_, point) = best.ok_or_else(|| Error::Internal("an empty penalty path".into()))?;
    Ok((point, steps))
}

/// The folds a set allows: at most `wanted`, at most the count of its
/// rarest label; an error when that label has a single example.
fn folds_for(set: &TrainingSet, wanted: usize) -> Result<usize> {
    let mut counts = vec![0usize; set.classes];
    for &y in &set.labels {
        counts[y as usize] += 1;
    }
    let (rarest, count) = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .min_by_key(|(_, &c)| c)
        .map(|(j, &c)| (j, c))
        .ok_or_else(|| Error::InvalidArgument("training needs examples".into()))?;
    if count < 2 {
        return Err(Error::InvalidArgument(format!(
            "label {rarest} has a single example: cross-validation needs at least two \
             of each label; add examples, or train without validation"
        )));
    }
    Ok(wanted.min(count))
}

/// Trains a linear head with L-BFGS: penalty by cross-validation (unless
/// given), refit on every example, temperature when it helps. `on_step`
/// sees each path point's and the refit's metrics with the planned number
/// of steps; `cancel` is checked at every L-BFGS iteration.
pub fn train_linear(
    set: &TrainingSet,
    params: &TrainingParams,
    cancel: &CancellationToken,
    on_step: &mut dyn FnMut(&HeadMetrics, usize),
) -> Result<TrainedHead> {
    let folds = match params.cv_folds {
        0 => 0,
        wanted => folds_for(set, wanted)?,
    };
    let mut rng = Rng(params.seed);
    let data = fold_order(set, folds, params.balance_classes, &mut rng);
    let total_weight: f64 = data.weights.iter().sum();
    let planned = planned_steps(&TrainingParams {
        cv_folds: folds,
        ..params.clone()
    });
    // A given penalty is for the whole set; in C it means the same on a fold.
    let given_c = (params.l2 > 0.0).then(|| 1.0 / (params.l2 * total_weight));
    let (c, validation, init, steps) = if folds == 0 {
        // Without validation and without a penalty: scikit-learn's default C = 1.
        (given_c.unwrap_or(1.0), None, None, 0)
    } else {
        let grid = given_c.map_or_else(c_grid, |c| vec![c]);
        let (point, steps) = choose_penalty(&data, &grid, planned, cancel, on_step)?;
        let calibration = Scores {
            logits: &point.oof,
            classes: data.classes,
            labels: &data.labels,
        }
        .calibrate();
        (point.c, Some(calibration), Some(mean(&point.thetas)), steps)
    };
    let problem = Problem::new(&data, data.all(), c);
    let init = init.unwrap_or_else(|| vec![0.0; problem.parameters()]);
    let mut theta = problem.solve(init, REFIT_TOLERANCE, cancel)?.x;
    let temperature = validation.and_then(|v| v.temperature);
    if let Some(t) = temperature {
        theta.iter_mut().for_each(|v| *v /= t);
    }
    let (train_loss, train_accuracy) = problem.fit_metrics(&theta);
    let metrics = HeadMetrics {
        epoch: steps + 1,
        train_loss: train_loss as f32,
        train_accuracy: train_accuracy as f32,
        validation_loss: validation.map(|v| v.loss as f32),
        validation_accuracy: validation.map(|v| v.accuracy as f32),
        validation_ece: validation.map(|v| v.ece as f32),
        temperature: temperature.map(|t| t as f32),
    };
    on_step(&metrics, planned);
    Ok(TrainedHead {
        weights: head_weights(&problem, &theta),
        metrics,
        train_examples: set.len(),
        validation_examples: if folds > 0 { set.len() } else { 0 },
        params: TrainingParams {
            l2: problem.l2,
            cv_folds: folds,
            ..params.clone()
        },
    })
}

/// The element-wise mean of the folds' solutions: the refit's warm start.
fn mean(thetas: &[Vec<f64>]) -> Vec<f64> {
    let mut out = vec![0.0; thetas[0].len()];
    for theta in thetas {
        out.iter_mut().zip(theta).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= thetas.len() as f64);
    out
}

/// The published layer; a label without examples gets zero weights and a
/// bias far below the others, so it is never predicted.
fn head_weights(problem: &Problem, theta: &[f64]) -> HeadWeights {
    let (k, d) = (problem.data.classes, problem.data.dim);
    let (w, b) = theta.split_at(k * d);
    let lowest = (0..k)
        .filter(|&j| problem.active[j])
        .map(|j| b[j])
        .fold(f64::INFINITY, f64::min);
    let bias = (0..k)
        .map(|j| {
            if problem.active[j] {
                b[j] as f32
            } else {
                (lowest - UNSEEN_MARGIN) as f32
            }
        })
        .collect();
    HeadWeights::Linear {
        output: Dense {
            weight: w.iter().map(|&v| v as f32).collect(),
            bias,
            inputs: d,
            outputs: k,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{HeadKind, Solver};

    fn set(features: Vec<f32>, dim: usize, labels: Vec<u32>, classes: usize) -> TrainingSet {
        TrainingSet::new(features, dim, labels, classes)
    }

    /// `per_class` points around each of three centres in 2-D; `spread`
    /// decides whether the classes overlap.
    fn three_clouds(per_class: usize, spread: f32, seed: u64) -> TrainingSet {
        let centres = [(1.0, 0.0), (-0.5, 0.8), (-0.5, -0.8)];
        let mut rng = Rng(seed);
        let (mut features, mut labels) = (Vec::new(), Vec::new());
        for i in 0..per_class * 3 {
            let (cx, cy) = centres[i % 3];
            features.push(cx + spread * (rng.next_f32() - 0.5));
            features.push(cy + spread * (rng.next_f32() - 0.5));
            labels.push((i % 3) as u32);
        }
        set(features, 2, labels, 3)
    }

    fn fixed_penalty(l2: f64) -> TrainingParams {
        TrainingParams {
            l2,
            cv_folds: 0,
            ..TrainingParams::default()
        }
    }

    fn fit(set: &TrainingSet, params: &TrainingParams) -> TrainedHead {
        train_linear(set, params, &CancellationToken::new(), &mut |_, _| {}).unwrap()
    }

    fn layer(head: &TrainedHead) -> &Dense {
        match &head.weights {
            HeadWeights::Linear { output } => output,
            HeadWeights::Mlp { .. } => panic!("a linear head"),
        }
    }

    /// The same objective minimised independently: plain gradient descent in
    /// f64 with naive loops, from zero, for many steps.
    fn reference_optimum(set: &TrainingSet, l2: f64) -> (Vec<f64>, Vec<f64>) {
        let (n, d, k) = (set.len(), set.dim, set.classes);
        let (mut w, mut b) = (vec![0.0; k * d], vec![0.0; k]);
        for _ in 0..200_000 {
            let (mut gw, mut gb) = (vec![0.0; k * d], vec![0.0; k]);
            for i in 0..n {
                let x = &set.features[i * d..(i + 1) * d];
                let z: Vec<f64> = (0..k)
                    .map(|j| b[j] + (0..d).map(|t| w[j * d + t] * f64::from(x[t])).sum::<f64>())
                    .collect();
                let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                for j in 0..k {
                    let p = (z[j] - max).exp() / sum;
                    let r = (p - f64::from(u8::from(j == set.labels[i] as usize))) / n as f64;
                    gb[j] += r;
                    for t in 0..d {
                        gw[j * d + t] += r * f64::from(x[t]);
                    }
                }
            }
            for (wv, g) in w.iter_mut().zip(&gw) {
                *wv -= 0.5 * (g + l2 * *wv);
            }
            for (bv, g) in b.iter_mut().zip(&gb) {
                *bv -= 0.5 * g;
            }
        }
        (w, b)
    }

    fn assert_matches_reference(set: &TrainingSet, l2: f64) {
        let head = fit(set, &fixed_penalty(l2));
        let (w, b) = reference_optimum(set, l2);
        let out = layer(&head);
        for (got, want) in out.weight.iter().zip(&w) {
            assert!(
                (f64::from(*got) - want).abs() < 2e-3,
                "{:?} vs {w:?}",
                out.weight
            );
        }
        // The bias is defined up to a constant; both sum to zero here.
        for (got, want) in out.bias.iter().zip(&b) {
            assert!(
                (f64::from(*got) - want).abs() < 2e-3,
                "{:?} vs {b:?}",
                out.bias
            );
        }
    }

    #[test]
    fn reaches_the_optimum_of_a_separable_problem() {
        let set = three_clouds(10, 0.4, 1);
        assert_matches_reference(&set, 0.05);
    }

    #[test]
    fn reaches_the_optimum_of_an_overlapping_problem() {
        let set = three_clouds(10, 3.0, 2);
        assert_matches_reference(&set, 0.01);
    }

    #[test]
    fn without_features_the_probabilities_are_the_class_frequencies() {
        // A closed form: with x = 0 only the bias fits, and softmax(b) is the
        // share of each label (1/6, 2/6, 3/6).
        let labels = vec![0, 1, 1, 2, 2, 2];
        let set = set(vec![0.0; 6], 1, labels, 3);
        let head = fit(&set, &fixed_penalty(1.0));
        let p = head.weights.probabilities(&[0.0]);
        for (got, want) in p.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 1e-5, "{p:?}");
        }
        // Balanced classes weigh each label alike: uniform probabilities.
        let balanced = TrainingParams {
            balance_classes: true,
            ..fixed_penalty(1.0)
        };
        let p = fit(&set, &balanced).weights.probabilities(&[0.0]);
        assert!(p.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-5), "{p:?}");
    }

    #[test]
    fn cross_validation_chooses_a_penalty_and_reports_out_of_fold_metrics() {
        let set = three_clouds(40, 1.5, 3);
        let mut steps = Vec::new();
        let head = train_linear(
            &set,
            &TrainingParams::default(),
            &CancellationToken::new(),
            &mut |m, planned| steps.push((m.clone(), planned)),
        )
        .unwrap();
        let planned = c_grid().len() + 1;
        assert!(steps.iter().all(|(_, p)| *p == planned));
        let epochs: Vec<usize> = steps.iter().map(|(m, _)| m.epoch).collect();
        assert_eq!(epochs, (1..=steps.len()).collect::<Vec<_>>());
        let m = &head.metrics;
        assert_eq!(m.epoch, steps.len());
        assert!(m.validation_accuracy.unwrap() > 0.8, "{m:?}");
        assert!(m.validation_ece.unwrap() < 0.15, "{m:?}");
        assert_eq!((head.train_examples, head.validation_examples), (120, 120));
        assert_eq!(head.params.cv_folds, 5);
        assert!(head.params.l2 > 0.0);
        // The chosen penalty is one of the path's, scaled to the whole set.
        assert!(c_grid()
            .iter()
            .any(|c| (1.0 / (c * 120.0) - head.params.l2).abs() < 1e-9 * head.params.l2));
    }

    #[test]
    fn the_same_seed_gives_the_same_head() {
        let set = three_clouds(30, 2.0, 4);
        let params = TrainingParams {
            seed: 7,
            ..TrainingParams::default()
        };
        let (a, b) = (fit(&set, &params), fit(&set, &params));
        assert_eq!(a.weights, b.weights);
        assert_eq!(a.metrics, b.metrics);
        assert_eq!(a.params, b.params);
    }

    #[test]
    fn a_label_seen_once_cannot_be_cross_validated_but_trains_without_validation() {
        let set = set(vec![0.0, 1.0, 0.1, 0.9, 1.0, 0.0], 2, vec![0, 0, 1], 2);
        let err = train_linear(
            &set,
            &TrainingParams::default(),
            &CancellationToken::new(),
            &mut |_, _| {},
        )
        .map(|_| ())
        .unwrap_err();
        assert!(err.to_string().contains("single example"), "{err}");

        // One example per label, without validation: C = 1.
        let one_each = TrainingSet {
            features: vec![0.0, 1.0, 1.0, 0.0],
            dim: 2,
            labels: vec![0, 1],
            classes: 2,
        };
        let head = fit(&one_each, &fixed_penalty(0.0));
        assert_eq!(head.params.l2, 0.5);
        assert!(head.metrics.validation_accuracy.is_none());
        let p = head.weights.probabilities(&[0.0, 1.0]);
        assert!(p[0] > 0.5, "{p:?}");
    }

    #[test]
    fn a_label_without_examples_is_never_predicted() {
        let mut set = three_clouds(20, 1.0, 5);
        set.labels.iter_mut().for_each(|y| *y = (*y).min(1));
        let head = fit(&set, &TrainingParams::default());
        for i in 0..set.len() {
            let p = head.weights.probabilities(&set.features[i * 2..i * 2 + 2]);
            assert!(p[2] < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn cancellation_stops_the_solver() {
        let token = CancellationToken::new();
        token.cancel();
        let set = three_clouds(10, 1.0, 6);
        let result = train_linear(&set, &TrainingParams::default(), &token, &mut |_, _| {});
        assert!(matches!(result, Err(Error::Cancelled(_))));
    }

    #[test]
    fn an_mlp_is_not_for_this_solver() {
        let set = three_clouds(10, 1.0, 7);
        let kind = HeadKind::Mlp {
            hidden_size: 4,
            dropout: 0.0,
        };
        let params = TrainingParams {
            solver: Solver::Lbfgs,
            ..TrainingParams::default()
        };
        let result = crate::head::train::train(
            &set,
            &kind,
            &params,
            &CancellationToken::new(),
            &mut |_, _| {},
        );
        assert!(matches!(result, Err(Error::InvalidArgument(_))));
    }
}
