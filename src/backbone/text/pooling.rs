//! Token vectors of one text to one vector, by the request's [`Pooling`].

use crate::backbone::{EmbedOptions, Pooling};

/// One text's answer: its token rows pooled by `options.pooling`, scaled to
/// unit length when `options.normalize` asks for it.
pub fn pooled(rows: &[f32], hidden: usize, options: EmbedOptions) -> Vec<f32> {
    let vector = pool_rows(rows, hidden, options.pooling);
    if options.normalize {
        crate::nn::l2_normalize(vector)
    } else {
        vector
    }
}

/// The pooled vector of one text's token rows (`[tokens, hidden]`,
/// row-major, at least one row).
pub fn pool_rows(rows: &[f32], hidden: usize, pooling: Pooling) -> Vec<f32> {
    let tokens = rows.len() / hidden;
    match pooling {
        Pooling::Cls => rows[..hidden].to_vec(),
        Pooling::LastToken => rows[(tokens.max(1) - 1) * hidden..][..hidden].to_vec(),
        Pooling::Mean => weighted_sum(rows, hidden, |_| 1.0 / tokens.max(1) as f32),
        Pooling::WeightedMean => {
            // Weights 1..=n over their sum n(n+1)/2.
            let total = (tokens * (tokens + 1) / 2).max(1) as f32;
            weighted_sum(rows, hidden, |position| (position + 1) as f32 / total)
        }
    }
}

fn weighted_sum(rows: &[f32], hidden: usize, weight: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut sum = vec![0f32; hidden];
    for (position, row) in rows.chunks_exact(hidden).enumerate() {
        let w = weight(position);
        sum.iter_mut().zip(row).for_each(|(s, v)| *s += w * v);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];

    #[test]
    fn every_pooling_of_three_rows() {
        assert_eq!(pool_rows(&ROWS, 2, Pooling::Cls), [1.0, 2.0]);
        assert_eq!(pool_rows(&ROWS, 2, Pooling::LastToken), [5.0, 6.0]);
        assert_eq!(pool_rows(&ROWS, 2, Pooling::Mean), [3.0, 4.0]);
        // (1*1 + 2*3 + 3*5) / 6 and (1*2 + 2*4 + 3*6) / 6.
        let weighted = pool_rows(&ROWS, 2, Pooling::WeightedMean);
        assert!((weighted[0] - 22.0 / 6.0).abs() < 1e-6, "{weighted:?}");
        assert!((weighted[1] - 28.0 / 6.0).abs() < 1e-6, "{weighted:?}");
    }

    #[test]
    fn one_row_is_its_own_pool() {
        for pooling in [
            Pooling::Cls,
            Pooling::LastToken,
            Pooling::Mean,
            Pooling::WeightedMean,
        ] {
            assert_eq!(pool_rows(&ROWS[..2], 2, pooling), [1.0, 2.0], "{pooling:?}");
        }
    }
}
