//! Uploading a large training set with UploadDataset, in chunks well under
//! the server's message limit, with a progress line on a terminal.

use anyhow::Result;
use prost::Message;
use tonic::transport::Channel;

use super::{chunks, describe, progress::StatusLine};
use crate::proto::{self, trainer_client::TrainerClient};

/// Bytes of examples per chunk: a small share of the server's default 16 MiB
/// message limit, so a chunk passes however the server is configured near it.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Examples per chunk at most, whatever their size.
const CHUNK_EXAMPLES: usize = 4096;

/// A size for a person: KiB below a MiB, MiB above.
fn size(bytes: usize) -> String {
    const KIB: f64 = 1024.0;
    if (bytes as f64) < KIB * KIB {
        format!("{:.1} KiB", bytes as f64 / KIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / (KIB * KIB))
    }
}

/// Uploads `examples` and returns the dataset the server made of them.
pub async fn upload(channel: Channel, examples: Vec<proto::Example>) -> Result<proto::Dataset> {
    let sizes: Vec<usize> = examples.iter().map(Message::encoded_len).collect();
    let total_bytes: usize = sizes.iter().sum();
    let total = examples.len();
    let ranges = chunks::plan(&sizes, CHUNK_EXAMPLES, CHUNK_BYTES);
    let mut rest = examples.into_iter();
    let mut status = StatusLine::stderr();
    let (mut sent, mut sent_bytes) = (0usize, 0usize);
    // Chunks are cut as the transport asks for them; the line shows what has
    // been handed to it.
    let requests = ranges.into_iter().map(move |range| {
        sent += range.len();
        sent_bytes += sizes[range.clone()].iter().sum::<usize>();
        status.update(&format!(
            "uploading {sent}/{total} examples ({} of {})",
            size(sent_bytes),
            size(total_bytes)
        ));
        if sent == total {
            status.end();
        }
        proto::UploadDatasetRequest {
            examples: rest.by_ref().take(range.len()).collect(),
        }
    });
    let dataset = TrainerClient::new(channel)
        .upload_dataset(futures_util::stream::iter(requests))
        .await
        .map_err(describe)?
        .into_inner();
    eprintln!(
        "uploaded {} examples ({}) as dataset {}",
        dataset.example_count,
        size(total_bytes),
        dataset.dataset_id
    );
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_in_kib_or_mib() {
        assert_eq!(super::size(1536), "1.5 KiB");
        assert_eq!(super::size(3 * 1024 * 1024), "3.0 MiB");
    }
}
