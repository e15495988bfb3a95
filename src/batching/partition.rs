//! Splits a batch into forward passes of similar lengths.
//!
//! A forward pass computes every item at the length of its longest one, so one
//! long text in a batch of short ones multiplies the work. Sorting by length and
//! cutting the sorted run where that saves more padding than an extra pass costs
//! keeps the padding small without giving up batching.

/// Cost of starting one more forward pass, in padded tokens. On CPU a pass has a
/// fixed part (weight traffic, thread hand-offs) worth a few dozen tokens of
/// compute; a higher value makes fewer, more padded passes.
pub const PASS_OVERHEAD_TOKENS: usize = 32;

/// Given item lengths, returns groups of item indices, each group one forward
/// pass, minimising `sum(group_len * longest_in_group) + PASS_OVERHEAD_TOKENS *
/// groups`. Groups are in ascending length order; every index appears once.
pub fn by_length(lengths: &[usize]) -> Vec<Vec<usize>> {
    let n = lengths.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| lengths[i]);
    let sorted: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();

    // best[j]: cheapest cost of the first j sorted items; cut[j]: where its last
    // group starts. O(n^2) for a batch of at most a few hundred items.
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0usize; n + 1];
    best[0] = 0;
    for j in 1..=n {
        for i in 0..j {
            let cost = best[i] + (j - i) * sorted[j - 1] + PASS_OVERHEAD_TOKENS;
            if cost < best[j] {
                best[j] = cost;
                cut[j] = i;
            }
        }
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = cut[j];
        groups.push(order[i..j].to_vec());
        j = i;
    }
    groups.reverse();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(lengths: &[usize], groups: &[Vec<usize>]) -> usize {
        groups
            .iter()
            .map(|g| g.len() * g.iter().map(|&i| lengths[i]).max().unwrap() + PASS_OVERHEAD_TOKENS)
            .sum()
    }

    #[test]
    fn similar_lengths_stay_in_one_pass() {
        let lengths = [12, 14, 13, 15, 12, 16];
        assert_eq!(by_length(&lengths).len(), 1);
    }

    #[test]
    fn an_outlier_gets_its_own_pass() {
        let lengths = [12, 14, 256, 13, 15, 12, 16, 11];
        let groups = by_length(&lengths);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[1], vec![2]);
    }

    #[test]
    fn every_item_appears_once_and_the_split_is_optimal() {
        // Exhaustive check against every way of cutting the sorted lengths.
        let lengths = [40, 3, 90, 7, 7, 64, 12, 200, 5];
        let groups = by_length(&lengths);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());

        let mut sorted: Vec<usize> = (0..lengths.len()).collect();
        sorted.sort_by_key(|&i| lengths[i]);
        let n = sorted.len();
        let mut best = usize::MAX;
        for mask in 0..(1u32 << (n - 1)) {
            let mut split = Vec::new();
            let mut current = vec![sorted[0]];
            for (k, &item) in sorted.iter().enumerate().skip(1) {
                if mask & (1 << (k - 1)) != 0 {
                    split.push(std::mem::take(&mut current));
                }
                current.push(item);
            }
            split.push(current);
            best = best.min(cost(&lengths, &split));
        }
        assert_eq!(cost(&lengths, &groups), best);
    }

    #[test]
    fn empty_input_gives_no_pass() {
        assert!(by_length(&[]).is_empty());
    }
}
