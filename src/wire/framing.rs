//! gRPC's length-prefixed message framing, read as a body streams in: every
//! message starts with a 5-byte prefix (compression flag, big-endian u32
//! length), so an oversized message is known from its prefix, before any of
//! it is buffered.

const PREFIX_LEN: usize = 5;

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
}

impl FrameScanner {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            payload_left: 0,
            pending: 0,
        }
    }

    /// Bytes of the message under way; 0 between messages.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Consumes one chunk; returns the declared size of the first message that is
    /// over the limit.
    pub fn scan(&mut self, mut chunk: &[u8]) -> Result<(), usize> {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(chunk.len());
                self.payload_left -= skip;
                self.pending += skip;
                if self.payload_left == 0 {
                    self.pending = 0;
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
                    return Err(len);
                }
                self.payload_left = len;
                if len == 0 {
                    self.pending = 0;
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
            assert_eq!(result, Some(Err(17)), "chunk size {chunk_size}");
        }
    }
}
