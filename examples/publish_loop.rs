//! Publishes versions of one head into a head store as fast as it can, each
//! version's number on a line: the process tests/integration/crash_safety.rs kills with
//! SIGKILL at random moments, and several of which tests/integration/storage.rs runs at
//! once against one store.
//!
//! Usage: publish_loop STORE_DIR [COUNT]
//!        publish_loop s3 ENDPOINT BUCKET PREFIX [COUNT]
//! Forever unless COUNT is given. On S3 the credentials come from the
//! environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

// A tool for the crash tests: it stops at its first failure, with the
// message saying which, and the test reads its exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use tlserve::{
    head::store::{HeadStore, DEFAULT_RESIDENT_ADAPTERS},
    storage::Storage,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (location, count) = support::store_from_args(
        "usage: publish_loop STORE_DIR [COUNT] | publish_loop s3 ENDPOINT BUCKET PREFIX [COUNT]",
    );
    let storage = Storage::open(&location).expect("open storage");
    let store = HeadStore::open(storage, usize::MAX, DEFAULT_RESIDENT_ADAPTERS)
        .await
        .expect("open store");
    // Weights of a realistic size (a 384 x 64 linear head) so that a kill often
    // lands inside the write, not between two.
    let (meta, weights) = support::linear_head("crash", 384, 64);
    for _ in 0..count.unwrap_or(usize::MAX) {
        let head = store
            .publish(meta.clone(), weights.clone(), None)
            .await
            .expect("publish");
        println!("{}", head.meta.version);
    }
}
