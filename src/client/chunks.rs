//! Cutting a list of items into consecutive requests bounded by a number of
//! items and a number of bytes, so that no message nears the server's limit.

use std::ops::Range;

/// Consecutive ranges of `sizes` (each item's encoded bytes) holding at most
/// `max_items` items and, unless one item alone is larger, at most
/// `max_bytes` bytes.
pub fn plan(sizes: &[usize], max_items: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let max_items = max_items.max(1);
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (index, &size) in sizes.iter().enumerate() {
        let full = index - start == max_items || bytes.saturating_add(size) > max_bytes;
        if index > start && full {
            ranges.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_respect_both_bounds_and_cover_every_item_once() {
        assert_eq!(plan(&[1; 5], 2, 100), [0..2, 2..4, 4..5]);
        assert_eq!(plan(&[4, 4, 4, 1], 10, 8), [0..2, 2..4]);
        assert!(plan(&[], 3, 10).is_empty());
    }

    #[test]
    fn an_item_larger_than_the_byte_bound_travels_alone() {
        assert_eq!(plan(&[2, 50, 2], 10, 10), [0..1, 1..2, 2..3]);
    }
}
