//! Limited-memory BFGS for smooth, unconstrained minimisation in f64: the
//! solver of convex heads (softmax regression with an L2 penalty), where it
//! reaches the optimum in a few hundred full-batch steps instead of the
//! thousands of mini-batch steps a first-order method needs.
//!
//! The direction comes from the usual two-loop recursion over the last
//! `memory` steps; the step length from a backtracking line search on the
//! Armijo condition (quadratic interpolation, halving at least). Curvature
//! pairs that would break positive definiteness are skipped, so the search
//! direction always descends. Everything is sequential and deterministic.

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// When to stop.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Most iterations (each one or more objective evaluations).
    pub max_iterations: usize,
    /// Converged when the gradient's largest component is at most this.
    pub gradient_tolerance: f64,
    /// Converged when an iteration lowers the objective by less than this,
    /// relative to its size (at least 1).
    pub relative_decrease: f64,
    /// Curvature pairs kept.
    pub memory: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_iterations: 1000,
            gradient_tolerance: 1e-5,
            relative_decrease: 1e-10,
            memory: 10,
        }
    }
}

/// Where the minimisation ended.
#[derive(Debug, Clone)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub value: f64,
    pub iterations: usize,
    /// False when `max_iterations` ran out first.
    pub converged: bool,
}

/// An objective: its value at `x`, with its gradient written to `gradient`.
pub type Objective<'a> = dyn FnMut(&[f64], &mut [f64]) -> Result<f64> + 'a;

/// One accepted step: `s = x' - x`, `y = g' - g`, `rho = 1 / s.y`.
struct Pair {
    s: Vec<f64>,
    y: Vec<f64>,
    rho: f64,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// The quasi-Newton direction `-H g` (two-loop recursion).
fn direction(gradient: &[f64], pairs: &VecDeque<Pair>) -> Vec<f64> {
    let mut q: Vec<f64> = gradient.to_vec();
    let mut alphas = Vec::with_capacity(pairs.len());
    for pair in pairs.iter().rev() {
        let alpha = pair.rho * dot(&pair.s, &q);
        q.iter_mut().zip(&pair.y).for_each(|(q, y)| *q -= alpha * y);
        alphas.push(alpha);
    }
    // Scale by the latest curvature estimate: a well-sized first trial step.
    if let Some(last) = pairs.back() {
        let gamma = 1.0 / (last.rho * dot(&last.y, &last.y));
        q.iter_mut().for_each(|q| *q *= gamma);
    }
    for (pair, alpha) in pairs.iter().zip(alphas.into_iter().rev()) {
        let beta = pair.rho * dot(&pair.y, &q);
        q.iter_mut()
            .zip(&pair.s)
            .for_each(|(q, s)| *q += (alpha - beta) * s);
    }
    q.iter_mut().for_each(|q| *q = -*q);
    q
}

/// A point with its value and gradient.
struct Point {
    x: Vec<f64>,
    value: f64,
    gradient: Vec<f64>,
}

/// Backtracking line search along `d` from `at`; None when no step lowers the
/// objective enough (the optimum is reached to the precision of the objective).
fn line_search(
    objective: &mut Objective,
    at: &Point,
    d: &[f64],
    first_step: f64,
) -> Result<Option<Point>> {
    const ARMIJO: f64 = 1e-4;
    let slope = dot(&at.gradient, d);
    let mut step = first_step;
    let mut x = vec![0.0; at.x.len()];
    let mut gradient = vec![0.0; at.x.len()];
    for _ in 0..40 {
        x.iter_mut()
            .zip(at.x.iter().zip(d))
            .for_each(|(x, (a, d))| *x = a + step * d);
        let value = objective(&x, &mut gradient)?;
        if value.is_finite() && value <= at.value + ARMIJO * step * slope {
            return Ok(Some(Point { x, value, gradient }));
        }
        // Minimum of the quadratic through f(0), f'(0) and f(step), kept
        // within [0.1, 0.5] of the step.
        let curvature = value - at.value - slope * step;
        let next = if value.is_finite() && curvature > 0.0 {
            -slope * step * step / (2.0 * curvature)
        } else {
            0.5 * step
        };
        step = next.clamp(0.1 * step, 0.5 * step);
    }
    Ok(None)
}

/// Minimises `objective` from `x0`; checks `cancel` at every iteration.
pub fn minimize(
    objective: &mut Objective,
    x0: Vec<f64>,
    options: &Options,
    cancel: &CancellationToken,
) -> Result<Minimum> {
    let mut gradient = vec![0.0; x0.len()];
    let value = objective(&x0, &mut gradient)?;
    let mut at = Point {
        x: x0,
        value,
        gradient,
    };
    let mut pairs: VecDeque<Pair> = VecDeque::with_capacity(options.memory);
    for iteration in 0..options.max_iterations {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("the job was cancelled".into()));
        }
        if max_abs(&at.gradient) <= options.gradient_tolerance {
            return Ok(finish(at, iteration, true));
        }
        let mut d = direction(&at.gradient, &pairs);
        if dot(&d, &at.gradient) >= 0.0 {
            // Rounding broke the curvature model: restart from steepest descent.
            pairs.clear();
            d = at.gradient.iter().map(|g| -g).collect();
        }
        let first_step = if pairs.is_empty() {
            (1.0 / max_abs(&at.gradient)).min(1.0)
        } else {
            1.0
        };
        let Some(next) = line_search(objective, &at, &d, first_step)? else {
            return Ok(finish(at, iteration, true));
        };
        let decrease = at.value - next.value;
        remember(&mut pairs, &at, &next, options.memory);
        let scale = at.value.abs().max(next.value.abs()).max(1.0);
        at = next;
        if decrease <= options.relative_decrease * scale {
            return Ok(finish(at, iteration + 1, true));
        }
    }
    let iterations = options.max_iterations;
    Ok(finish(at, iterations, false))
}

/// Keeps the curvature pair of a step when it is positive enough.
fn remember(pairs: &mut VecDeque<Pair>, from: &Point, to: &Point, memory: usize) {
    let s: Vec<f64> = to.x.iter().zip(&from.x).map(|(a, b)| a - b).collect();
    let y: Vec<f64> = to
        .gradient
        .iter()
        .zip(&from.gradient)
        .map(|(a, b)| a - b)
        .collect();
    let sy = dot(&s, &y);
    if sy > 1e-12 * dot(&y, &y).max(f64::MIN_POSITIVE) && sy > 0.0 {
        if pairs.len() == memory {
            pairs.pop_front();
        }
        pairs.push_back(Pair {
            s,
            y,
            rho: 1.0 / sy,
        });
    }
}

fn finish(at: Point, iterations: usize, converged: bool) -> Minimum {
    Minimum {
        x: at.x,
        value: at.value,
        iterations,
        converged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_minimum_of_a_badly_scaled_quadratic() {
        // f(x) = sum_i c_i (x_i - i)^2 with curvatures over six orders of magnitude.
        let c = [1e-3, 1e-1, 1.0, 10.0, 1e3];
        let mut f = |x: &[f64], g: &mut [f64]| -> Result<f64> {
            let mut value = 0.0;
            for i in 0..x.len() {
                let r = x[i] - i as f64;
                value += c[i] * r * r;
                g[i] = 2.0 * c[i] * r;
            }
            Ok(value)
        };
        let options = Options {
            gradient_tolerance: 1e-10,
            relative_decrease: 0.0,
            ..Options::default()
        };
        let min = minimize(&mut f, vec![0.0; 5], &options, &CancellationToken::new()).unwrap();
        assert!(min.converged);
        for (i, x) in min.x.iter().enumerate() {
            assert!((x - i as f64).abs() < 1e-6, "{:?}", min.x);
        }
    }

    #[test]
    fn minimises_the_rosenbrock_function() {
        let mut f = |x: &[f64], g: &mut [f64]| -> Result<f64> {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            Ok((1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2))
        };
        let options = Options {
            gradient_tolerance: 1e-9,
            relative_decrease: 0.0,
            ..Options::default()
        };
        let min = minimize(&mut f, vec![-1.2, 1.0], &options, &CancellationToken::new()).unwrap();
        assert!((min.x[0] - 1.0).abs() < 1e-5 && (min.x[1] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn stops_when_cancelled() {
        let token = CancellationToken::new();
        token.cancel();
        let mut f = |x: &[f64], g: &mut [f64]| -> Result<f64> {
            g[0] = 2.0 * x[0];
            Ok(x[0] * x[0])
        };
        let result = minimize(&mut f, vec![3.0], &Options::default(), &token);
        assert!(matches!(result, Err(Error::Cancelled(_))));
    }
}
