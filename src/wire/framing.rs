//! gRPC's length-prefixed message framing, read as a body streams in: every
//! message starts with a 5-byte prefix (compression flag, big-endian u32
//! length), so an oversized message is known from its prefix, before any of
//! it is buffered. A message's bytes may also pass a [`FieldCounter`], which
//! refuses one with too many elements before it is decoded.

use super::field_count::FieldCounter;

const PREFIX_LEN: usize = 5;

/// Why a stream of messages is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A message declared this many bytes, more than the limit.
    TooLarge(usize),
    /// A message holds more than this many elements of the counted field.
    TooMany(usize),
}

/// Tracks where message prefixes fall in a stream of chunks.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    /// The largest message accepted, in bytes.
    pub limit: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_filled: usize,
    payload_left: usize,
    /// Bytes of the message under way (prefix included); 0 between messages.
    pending: usize,
    counter: Option<FieldCounter>,
    /// Messages whose last byte has arrived.
    completed: u64,
    /// Whether a message so far has its compression flag set.
    compressed: bool,
}

impl FrameScanner {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            payload_left: 0,
            pending: 0,
            counter: None,
            completed: 0,
            compressed: false,
        }
    }

    /// Also counts a repeated field in each message (see [`FieldCounter`]).
    pub fn counting(mut self, counter: FieldCounter) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Messages whose last byte has arrived so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Whether a message so far was flagged compressed.
    pub fn saw_compressed(&self) -> bool {
        self.compressed
    }

    /// Bytes of the message under way; 0 between messages.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Consumes one chunk; refuses the first message that is over the limit
    /// or holds too many elements.
    pub fn scan(&mut self, mut chunk: &[u8]) -> Result<(), Refusal> {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(chunk.len());
                if let Some(counter) = &mut self.counter {
                    counter.feed(&chunk[..skip]).map_err(Refusal::TooMany)?;
                }
                self.payload_left -= skip;
                self.pending += skip;
                if self.payload_left == 0 {
                    self.pending = 0;
                    self.completed += 1;
                }
                chunk = &chunk[skip..];
                continue;
            }
            let take = (PREFIX_LEN - self.prefix_filled).min(chunk.len());
            self.prefix[self.prefix_filled..self.prefix_filled + take]
                .copy_from_slice(&chunk[..take]);
            self.prefix_filled += take;
            self.pending += take;
            chunk = &chunk[take..];
            if self.prefix_filled == PREFIX_LEN {
                self.prefix_filled = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > self.limit {
                    return Err(Refusal::TooLarge(len));
                }
                if let Some(counter) = &mut self.counter {
                    counter.reset(self.prefix[0] != 0);
                }
                self.compressed |= self.prefix[0] & 1 != 0;
                self.payload_left = len;
                if len == 0 {
                    self.pending = 0;
                    self.completed += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len as usize));
        bytes
    }

    #[test]
    fn accepts_messages_up_to_the_limit_in_any_chunking() {
        let stream: Vec<u8> = [message(10), message(0), message(16)].concat();
        for chunk_size in 1..=stream.len() {
            let mut scanner = FrameScanner::new(16);
            for chunk in stream.chunks(chunk_size) {
                assert_eq!(scanner.scan(chunk), Ok(()), "chunk size {chunk_size}");
            }
        }
    }

    #[test]
    fn counts_the_bytes_of_the_message_under_way() {
        let stream: Vec<u8> = [message(10), message(0), message(4)].concat();
        let mut scanner = FrameScanner::new(16);
        scanner.scan(&stream[..3]).unwrap();
        assert_eq!(scanner.pending(), 3);
        scanner.scan(&stream[3..12]).unwrap();
        assert_eq!(scanner.pending(), 12);
        // The first message ends, the empty one passes, the third begins.
        scanner.scan(&stream[12..22]).unwrap();
        assert_eq!(scanner.pending(), 2);
        scanner.scan(&stream[22..]).unwrap();
        assert_eq!(scanner.pending(), 0);
        assert_eq!(scanner.completed(), 3);
        assert!(!scanner.saw_compressed());
        scanner.scan(&[1, 0, 0, 0, 0]).unwrap();
        assert!(scanner.saw_compressed());
    }

    #[test]
    fn counts_elements_per_message_and_skips_compressed_ones() {
        // Two messages of 3 empty `inputs` (field 2), then a compressed one.
        let inputs = |n: usize, flag: u8| {
            let mut bytes = vec![flag];
            bytes.extend_from_slice(&(2 * n as u32).to_be_bytes());
            bytes.extend(std::iter::repeat_n([0x12u8, 0], n).flatten());
            bytes
        };
        let stream: Vec<u8> = [inputs(3, 0), inputs(3, 0), inputs(9, 1)].concat();
        let counting = || FrameScanner::new(64).counting(FieldCounter::new(&[2], 3));
        let mut scanner = counting();
        assert_eq!(scanner.scan(&stream), Ok(()));
        let mut scanner = counting();
        assert_eq!(scanner.scan(&inputs(4, 0)), Err(Refusal::TooMany(4)));
    }

    #[test]
    fn refuses_an_oversized_message_even_when_its_prefix_is_split() {
        let stream: Vec<u8> = [message(3), message(17)].concat();
        for chunk_size in 1..=stream.len() {
            let mut scanner = FrameScanner::new(16);
            let result = stream
                .chunks(chunk_size)
                .map(|chunk| scanner.scan(chunk))
                .find(Result::is_err);
            assert_eq!(
                result,
                Some(Err(Refusal::TooLarge(17))),
                "chunk size {chunk_size}"
            );
        }
    }
}
