//! What the shared store costs a replica, on a volume (a folder) or on
//! S3-compatible object storage: publishing a head version, and looking a
//! head up as Predict does, on a hit (in memory) and on a miss (a version
//! another replica just published: a listing of the name and two reads).
//! Prints one JSON line per figure. scripts/bench-store.sh runs it against a
//! local folder and against moto's S3 server on loopback.
//!
//! ```sh
//! cargo run --release --example bench_store -- DIR [ROUNDS]
//! cargo run --release --example bench_store -- s3 ENDPOINT BUCKET PREFIX [ROUNDS]
//! ```

// A benchmark stops at its first failure, with the message saying which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use tlserve::{
    head::{
        store::{HeadStore, DEFAULT_RESIDENT_ADAPTERS},
        HeadRef,
    },
    storage::{Location, Storage},
};

fn report(backend: &str, what: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = times.iter().map(|&d| ms(d)).sum::<f64>() / times.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "backend": backend,
            "what": what,
            "rounds": times.len(),
            "p50_ms": ms(times[times.len() / 2]),
            "p90_ms": ms(times[times.len() * 9 / 10]),
            "mean_ms": mean,
        })
    );
}

#[tokio::main]
async fn main() {
    let (location, rounds) = support::store_from_args(
        "usage: bench_store DIR [ROUNDS] | bench_store s3 ENDPOINT BUCKET PREFIX [ROUNDS]",
    );
    let rounds = rounds.unwrap_or(30);
    let backend = match location {
        Location::Volume(_) => "volume",
        Location::S3(_) => "s3",
    };
    let open = || async {
        let storage = Storage::open(&location).expect("storage");
        HeadStore::open(storage, usize::MAX, DEFAULT_RESIDENT_ADAPTERS)
            .await
            .expect("store")
    };
    // The publishing replica, and one that serves.
    let (publisher, server) = (open().await, open().await);
    let (mut publish, mut hit, mut miss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // A head as the tests train: 384 features, 4 labels.
        let (meta, weights) = support::linear_head("bench", 384, 4);
        let started = Instant::now();
        let published = publisher
            .publish(meta, weights, None)
            .await
            .expect("publish");
        publish.push(started.elapsed());
        let reference = HeadRef {
            name: "bench".into(),
            version: Some(published.meta.version),
        };
        // The miss: the serving replica has not seen the version yet (its
        // next refresh is up to 2 s away).
        let started = Instant::now();
        let found = match server.cached(&reference) {
            Some(found) => found,
            None => server.get(&reference).await.expect("get"),
        };
        miss.push(started.elapsed());
        assert_eq!(found.meta.version, published.meta.version);
        let started = Instant::now();
        let again = server.cached(&reference).expect("in memory");
        hit.push(started.elapsed());
        assert_eq!(again.meta.version, published.meta.version);
        // Past the per-name rate limit on lookups of unknown versions.
        tokio::time::sleep(tlserve::head::store::REFRESH_INTERVAL).await;
    }
    report(backend, "publish", publish);
    report(backend, "lookup_miss", miss);
    report(backend, "lookup_hit", hit);
}
