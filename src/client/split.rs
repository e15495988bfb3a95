//! A stratified hold-out split: the same share of every label is held out,
//! chosen by a seeded shuffle so that the same seed gives the same split.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::examples::Example;
use crate::nn::rng::Rng;

/// Examples to train on and examples held out to evaluate on.
#[derive(Debug, Default)]
pub struct Split {
    pub train: Vec<Example>,
    pub holdout: Vec<Example>,
}

/// How many of `count` examples of a label are held out: the share rounded,
/// but never every one (the head must see each label) and none of a single
/// example.
fn held_out(count: usize, share: f64) -> usize {
    let wanted = (count as f64 * share).round() as usize;
    wanted.min(count.saturating_sub(1))
}

/// Holds out `share` (in (0, 1)) of each label's examples, picked by a
/// shuffle seeded with `seed`; both parts keep the input order.
pub fn stratified(examples: Vec<Example>, share: f64, seed: u64) -> Result<Split> {
    if !(share.is_finite() && share > 0.0 && share < 1.0) {
        bail!("--holdout must be a share in (0, 1), such as 0.2");
    }
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, example) in examples.iter().enumerate() {
        by_label.entry(&example.label).or_default().push(index);
    }
    let mut held = vec![false; examples.len()];
    let mut rng = Rng(seed);
    for indices in by_label.values_mut() {
        rng.shuffle(indices);
        for &index in &indices[..held_out(indices.len(), share)] {
            held[index] = true;
        }
    }
    let mut split = Split::default();
    for (example, held) in examples.into_iter().zip(held) {
        if held {
            split.holdout.push(example);
        } else {
            split.train.push(example);
        }
    }
    if split.holdout.is_empty() {
        bail!("--holdout {share} holds out no example: every label has too few");
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::examples::label_counts;

    fn examples(counts: &[(&str, usize)]) -> Vec<Example> {
        counts
            .iter()
            .flat_map(|&(label, n)| {
                (0..n).map(move |i| Example::text(label, &format!("{label}{i}")))
            })
            .collect()
    }

    #[test]
    fn every_label_keeps_its_share() {
        let split = stratified(
            examples(&[("a", 10), ("b", 20), ("c", 5), ("d", 1)]),
            0.2,
            7,
        )
        .unwrap();
        let held: Vec<(&str, usize)> = label_counts(&split.holdout).into_iter().collect();
        assert_eq!(held, [("a", 2), ("b", 4), ("c", 1)]);
        let train = label_counts(&split.train);
        assert_eq!(
            (train["a"], train["b"], train["c"], train["d"]),
            (8, 16, 4, 1)
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_split_and_another_seed_another() {
        let set = examples(&[("a", 30), ("b", 30)]);
        let first = stratified(set.clone(), 0.3, 1).unwrap();
        let again = stratified(set.clone(), 0.3, 1).unwrap();
        let other = stratified(set, 0.3, 2).unwrap();
        assert_eq!(first.holdout, again.holdout);
        assert_ne!(first.holdout, other.holdout);
    }

    #[test]
    fn a_label_is_never_held_out_entirely() {
        let split = stratified(examples(&[("a", 2), ("b", 2)]), 0.9, 0).unwrap();
        assert_eq!(split.holdout.len(), 2);
        assert_eq!(label_counts(&split.train).len(), 2);
    }

    #[test]
    fn bad_shares_and_sets_too_small_are_refused() {
        for share in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(stratified(examples(&[("a", 5)]), share, 0).is_err());
        }
        assert!(stratified(examples(&[("a", 1), ("b", 1)]), 0.5, 0).is_err());
    }
}
