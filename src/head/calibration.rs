//! Whether a head's probabilities mean what they say, measured on predictions
//! for examples the head did not learn from (out-of-fold or held-out logits):
//! expected calibration error, and temperature scaling (one scalar dividing
//! the logits, fitted by maximum likelihood) applied only when it lowers the
//! log-loss of predictions it was not fitted on.

/// Logits of examples a model did not learn from, with their labels.
pub struct Scores<'a> {
    /// `labels.len() * classes` logits, row-major; `-inf` for a class the
    /// model could not predict.
    pub logits: &'a [f32],
    pub classes: usize,
    pub labels: &'a [u32],
}

/// The outcome of calibrating one set of scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The temperature to divide logits by; None when scaling did not help.
    pub temperature: Option<f64>,
    /// Mean log-loss with that temperature.
    pub loss: f64,
    /// Share of examples whose most probable class is right.
    pub accuracy: f64,
    /// Expected calibration error with that temperature.
    pub ece: f64,
}

/// Equal-width confidence bins of the expected calibration error.
const ECE_BINS: usize = 15;

/// A probability is never taken below this in a log-loss (a class no fold
/// could learn would otherwise cost infinity).
const MIN_PROBABILITY: f64 = 1e-15;

impl Scores<'_> {
    fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    /// Log-probabilities of row `i` at temperature `t`.
    fn log_probabilities(&self, i: usize, t: f64) -> Vec<f64> {
        let z: Vec<f64> = self.row(i).iter().map(|&v| f64::from(v) / t).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        let log_sum = max + sum.ln();
        z.iter().map(|v| v - log_sum).collect()
    }

    /// Mean log-loss of `rows` at temperature `t`.
    fn loss(&self, rows: &[usize], t: f64) -> f64 {
        let total: f64 = rows
            .iter()
            .map(|&i| {
                let log_p = self.log_probabilities(i, t)[self.labels[i] as usize];
                -log_p.max(MIN_PROBABILITY.ln())
            })
            .sum();
        total / rows.len().max(1) as f64
    }

    /// The temperature that minimises the log-loss of `rows`: golden-section
    /// search on ln t over [1/20, 20] (the loss is convex in 1/t).
    fn fit_temperature(&self, rows: &[usize]) -> f64 {
        let ratio = (5f64.sqrt() - 1.0) / 2.0;
        let (mut lo, mut hi) = ((0.05f64).ln(), (20f64).ln());
        let mut a = hi - ratio * (hi - lo);
        let mut b = lo + ratio * (hi - lo);
        let (mut fa, mut fb) = (self.loss(rows, a.exp()), self.loss(rows, b.exp()));
        for _ in 0..60 {
            if fa <= fb {
                hi = b;
                (b, fb) = (a, fa);
                a = hi - ratio * (hi - lo);
                fa = self.loss(rows, a.exp());
            } else {
                lo = a;
                (a, fa) = (b, fb);
                b = lo + ratio * (hi - lo);
                fb = self.loss(rows, b.exp());
            }
        }
        ((lo + hi) / 2.0).exp()
    }

    /// Share of rows whose most probable class is their label.
    fn accuracy(&self) -> f64 {
        let correct = (0..self.labels.len())
            .filter(|&i| argmax(self.row(i)) == self.labels[i] as usize)
            .count();
        correct as f64 / self.labels.len().max(1) as f64
    }

    /// Expected calibration error at temperature `t`: the gap between
    /// confidence and accuracy in equal-width bins of top-class
    /// probability, weighted by the share of examples in each bin.
    pub fn ece(&self, t: f64) -> f64 {
        let mut bins = [(0usize, 0.0f64, 0.0f64); ECE_BINS];
        for i in 0..self.labels.len() {
            let log_p = self.log_probabilities(i, t);
            let top = argmax_f64(&log_p);
            let confidence = log_p[top].exp();
            let bin = ((confidence * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
            bins[bin].0 += 1;
            bins[bin].1 += confidence;
            bins[bin].2 += f64::from(u8::from(top == self.labels[i] as usize));
        }
        let n = self.labels.len().max(1) as f64;
        bins.iter()
            .filter(|(count, _, _)| *count > 0)
            .map(|(_, confidence, correct)| (confidence - correct).abs() / n)
            .sum()
    }

    /// Loss, accuracy and calibration error as they are (no temperature).
    pub fn summary(&self) -> Calibration {
        let all: Vec<usize> = (0..self.labels.len()).collect();
        Calibration {
            temperature: None,
            loss: self.loss(&all, 1.0),
            accuracy: self.accuracy(),
            ece: self.ece(1.0),
        }
    }

    /// Fits a temperature and keeps it only when it lowers the log-loss of
    /// predictions it was not fitted on: fitted on the even rows and scored
    /// on the odd ones, and the other way round.
    pub fn calibrate(&self) -> Calibration {
        let all: Vec<usize> = (0..self.labels.len()).collect();
        let (even, odd): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| i % 2 == 0);
        let base = self.loss(&all, 1.0);
        let temperature = if even.is_empty() || odd.is_empty() {
            None
        } else {
            let cross = (self.loss(&odd, self.fit_temperature(&even)) * odd.len() as f64
                + self.loss(&even, self.fit_temperature(&odd)) * even.len() as f64)
                / all.len() as f64;
            // A margin, so that rounding noise never switches scaling on.
            (cross < base * (1.0 - 1e-3)).then(|| self.fit_temperature(&all))
        };
        let t = temperature.unwrap_or(1.0);
        Calibration {
            temperature,
            loss: self.loss(&all, t),
            accuracy: self.accuracy(),
            ece: self.ece(t),
        }
    }
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn argmax_f64(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes whose true probability of class 0 is sigmoid(z); the
    /// logits given are `scale * z`.
    fn scores(scale: f32, n: usize) -> (Vec<f32>, Vec<u32>) {
        let mut rng = crate::nn::rng::Rng(5);
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let z = (rng.next_f32() - 0.5) * 8.0;
            let p0 = 1.0 / (1.0 + (-z).exp());
            labels.push(u32::from(rng.next_f32() >= p0));
            logits.extend([scale * z, 0.0]);
        }
        (logits, labels)
    }

    #[test]
    fn overconfident_logits_are_cooled_and_calibrated_ones_left_alone() {
        let (logits, labels) = scores(3.0, 4000);
        let s = Scores {
            logits: &logits,
            classes: 2,
            labels: &labels,
        };
        let c = s.calibrate();
        let t = c.temperature.expect("scaling helps overconfident logits");
        assert!((t - 3.0).abs() < 0.3, "temperature {t}");
        assert!(c.ece < s.ece(1.0) / 2.0, "{} vs {}", c.ece, s.ece(1.0));

        let (logits, labels) = scores(1.0, 4000);
        let s = Scores {
            logits: &logits,
            classes: 2,
            labels: &labels,
        };
        let c = s.calibrate();
        assert!(c.temperature.is_none_or(|t| (t - 1.0).abs() < 0.1), "{c:?}");
        assert!(c.ece < 0.05, "{c:?}");
    }

    #[test]
    fn ece_of_a_perfect_and_of_a_hopeless_model() {
        // Certain and right: no gap. Certain and always wrong: gap 1.
        let logits = [50.0, 0.0, 0.0, 50.0];
        let right = Scores {
            logits: &logits,
            classes: 2,
            labels: &[0, 1],
        };
        assert!(right.ece(1.0) < 1e-9);
        let wrong = Scores {
            logits: &logits,
            classes: 2,
            labels: &[1, 0],
        };
        assert!((wrong.ece(1.0) - 1.0).abs() < 1e-9);
    }
}
