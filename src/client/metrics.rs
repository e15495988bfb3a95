//! Classification metrics of a head on held-out examples: accuracy,
//! per-label precision, recall and F1, and the confusion matrix.

use std::collections::BTreeSet;

use serde::Serialize;

/// One label's figures. A ratio with a zero denominator (a label never
/// predicted, or never true) is 0, as scikit-learn reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Examples whose true label this is.
    pub support: usize,
}

/// The metrics of a set of (true, predicted) label pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub examples: usize,
    pub accuracy: f64,
    /// Unweighted means over the labels with examples.
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub per_label: Vec<LabelMetrics>,
    /// Every label seen, true or predicted, in name order: the rows and
    /// columns of `confusion`.
    pub labels: Vec<String>,
    /// `confusion[t][p]`: examples of true label `labels[t]` predicted as
    /// `labels[p]`.
    pub confusion: Vec<Vec<usize>>,
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

fn f1(precision: f64, recall: f64) -> f64 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

impl Evaluation {
    /// The metrics of `pairs` of (true label, predicted label).
    pub fn of(pairs: &[(String, String)]) -> Self {
        let labels: Vec<String> = pairs
            .iter()
            .flat_map(|(t, p)| [t, p])
            .collect::<BTreeSet<_>>()
            .into_iter()
            .cloned()
            .collect();
        // Every label of `pairs` is in `labels`: the search always finds it.
        let at = |label: &str| {
            labels
                .binary_search_by(|l| l.as_str().cmp(label))
                .unwrap_or(0)
        };
        let mut confusion = vec![vec![0usize; labels.len()]; labels.len()];
        for (truth, predicted) in pairs {
            confusion[at(truth)][at(predicted)] += 1;
        }
        let correct: usize = (0..labels.len()).map(|i| confusion[i][i]).sum();
        let per_label: Vec<LabelMetrics> = labels
            .iter()
            .enumerate()
            .map(|(i, label)| {
                let support: usize = confusion[i].iter().sum();
                let predicted: usize = confusion.iter().map(|row| row[i]).sum();
                let precision = ratio(confusion[i][i], predicted);
                let recall = ratio(confusion[i][i], support);
                LabelMetrics {
                    label: label.clone(),
                    precision,
                    recall,
                    f1: f1(precision, recall),
                    support,
                }
            })
            .collect();
        let with_examples = || per_label.iter().filter(|m| m.support > 0);
        Self {
            examples: pairs.len(),
            accuracy: ratio(correct, pairs.len()),
            macro_precision: mean(with_examples().map(|m| m.precision)),
            macro_recall: mean(with_examples().map(|m| m.recall)),
            macro_f1: mean(with_examples().map(|m| m.f1)),
            per_label,
            labels,
            confusion,
        }
    }

    /// The metrics as a table for a terminal.
    pub fn table(&self) -> String {
        let width = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .chain([9, "true \\ predicted".len()])
            .max()
            .unwrap_or(9);
        let mut out = format!(
            "accuracy {:.4} on {} examples\n\n{:<width$}  precision  recall     f1  support\n",
            self.accuracy, self.examples, "label"
        );
        for m in &self.per_label {
            out += &format!(
                "{:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n",
                m.label, m.precision, m.recall, m.f1, m.support
            );
        }
        out += &format!(
            "{:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}\n\n",
            "macro avg", self.macro_precision, self.macro_recall, self.macro_f1, self.examples
        );
        out += &self.confusion_table(width);
        out
    }

    /// Rows: true labels; columns: predicted labels.
    fn confusion_table(&self, width: usize) -> String {
        let cell = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .chain([self.examples.to_string().len()])
            .max()
            .unwrap_or(1);
        let mut out = format!("{:<width$}", "true \\ predicted");
        for label in &self.labels {
            out += &format!("  {label:>cell$}");
        }
        out.push('\n');
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            out += &format!("{label:<width$}");
            for count in row {
                out += &format!("  {count:>cell$}");
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect()
    }

    #[test]
    fn metrics_match_a_hand_computed_example() {
        // cat: 3 true, 2 right, 1 taken for a dog; dog: 2 true, both right,
        // plus that cat; bird: 1 true, predicted as a cat.
        let evaluation = Evaluation::of(&pairs(&[
            ("cat", "cat"),
            ("cat", "cat"),
            ("cat", "dog"),
            ("dog", "dog"),
            ("dog", "dog"),
            ("bird", "cat"),
        ]));
        assert_eq!(evaluation.labels, ["bird", "cat", "dog"]);
        assert_eq!(evaluation.confusion, [[0, 1, 0], [0, 2, 1], [0, 0, 2]]);
        assert!((evaluation.accuracy - 4.0 / 6.0).abs() < 1e-12);
        let cat = &evaluation.per_label[1];
        assert!((cat.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((cat.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((cat.f1 - 2.0 / 3.0).abs() < 1e-12);
        let dog = &evaluation.per_label[2];
        assert!((dog.precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!((dog.recall, dog.support), (1.0, 2));
        assert!((dog.f1 - 0.8).abs() < 1e-12);
        let bird = &evaluation.per_label[0];
        assert_eq!((bird.precision, bird.recall, bird.f1), (0.0, 0.0, 0.0));
        assert!((evaluation.macro_recall - (0.0 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_predicted_label_without_examples_is_a_column_not_in_the_means() {
        let evaluation = Evaluation::of(&pairs(&[("a", "a"), ("a", "z")]));
        assert_eq!(evaluation.labels, ["a", "z"]);
        assert_eq!(evaluation.confusion, [[1, 1], [0, 0]]);
        assert_eq!(evaluation.per_label[1].support, 0);
        assert_eq!(evaluation.macro_recall, 0.5);
        assert_eq!(evaluation.macro_precision, 1.0);
    }

    #[test]
    fn the_table_shows_every_label_and_the_matrix() {
        let table = Evaluation::of(&pairs(&[("cat", "cat"), ("dog", "cat")])).table();
        assert!(
            table.starts_with("accuracy 0.5000 on 2 examples"),
            "{table}"
        );
        let matrix: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("true \\ predicted"))
            .collect();
        assert_eq!(matrix.len(), 3, "{table}");
        assert!(
            matrix[1].starts_with("cat") && matrix[1].ends_with("1    0"),
            "{table}"
        );
        assert!(
            matrix[2].starts_with("dog") && matrix[2].ends_with("1    0"),
            "{table}"
        );
    }

    #[test]
    fn no_examples_give_zeros_not_nan() {
        let evaluation = Evaluation::of(&[]);
        assert_eq!(evaluation.accuracy, 0.0);
        assert_eq!(evaluation.macro_f1, 0.0);
    }
}
