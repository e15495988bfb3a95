//! Enforces the request message size limit as RESOURCE_EXHAUSTED, as the gRPC spec
//! asks (tonic's own limit answers OUT_OF_RANGE).
//!
//! The request body is watched as it streams in: every gRPC message starts with a
//! 5-byte prefix (compression flag, big-endian u32 length), so an oversized message
//! is refused as soon as its prefix arrives, before any of it is buffered.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

const PREFIX_LEN: usize = 5;

/// Tracks where message prefixes fall in a stream of chunks.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    limit: usize,
    prefix: [u8; PREFIX_LEN],
    prefix_filled: usize,
    payload_left: usize,
}

impl FrameScanner {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            payload_left: 0,
        }
    }

    /// Consumes one chunk; returns the declared size of the first message that is
    /// over the limit.
    pub fn scan(&mut self, mut chunk: &[u8]) -> Result<(), usize> {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(chunk.len());
                self.payload_left -= skip;
                chunk = &chunk[skip..];
                continue;
            }
            let take = (PREFIX_LEN - self.prefix_filled).min(chunk.len());
            self.prefix[self.prefix_filled..self.prefix_filled + take]
                .copy_from_slice(&chunk[..take]);
            self.prefix_filled += take;
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
            }
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED on an oversized message.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        scanner: FrameScanner,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: usize) -> Self {
        Self {
            inner,
            scanner: FrameScanner::new(limit),
            failed: false,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            if let Err(len) = this.scanner.scan(data) {
                *this.failed = true;
                return Poll::Ready(Some(Err(Status::from(crate::Error::LimitExceeded(
                    format!(
                        "request message is {len} bytes; this server accepts at most {} \
                         (limits.max_message_bytes)",
                        this.scanner.limit
                    ),
                )))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
