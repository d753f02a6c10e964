//! Spool append throughput: durable (fsynced) appends per second, one at a time and
//! with many requests in flight sharing group commits.
//!
//! Informs: how many events and log blobs per second one edge can acknowledge
//! durably. `cargo bench --bench spool_append` appends 10 KB records (the size of a
//! playback event); under `cargo test` it runs a few hundred as a smoke test.
//! Last results are in README.md ("Performance").

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use cdn_edge::forward::record::Record;
use cdn_edge::forward::spool::{Queue, Spool};
use cdn_edge::metrics::Metrics;

fn record(n: usize, body: &Bytes) -> Record {
    Record {
        arrival_ms: 1_800_000_000_000,
        client_ip: "203.0.113.7".into(),
        method: "POST".into(),
        target: format!("/msl/playapi/cadmium/event/1?reqName=events/pause&reqId=bench-{n}"),
        content_type: Some("application/json".into()),
        dedupe_key: Some(format!("bench-{n}")),
        body: body.clone(),
    }
}

#[allow(clippy::print_stdout)]
fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sequential, concurrent, in_flight) = if full {
        (500, 20_000, 256)
    } else {
        (20, 400, 32)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Arc::new(Spool::open(dir.path(), 1 << 40, 600_000, metrics.clone()).unwrap());
    let body = Bytes::from(vec![b'e'; 10_000]);

    rt.block_on(async {
        let started = Instant::now();
        for n in 0..sequential {
            spool.append(Queue::Events, &record(n, &body)).await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!("spool_append: one at a time: {sequential} appends in {secs:.2} s = {:.0}/s", sequential as f64 / secs);

        let commits_before = metrics.spool_commits.get();
        let started = Instant::now();
        let per_task = concurrent / in_flight;
        let tasks: Vec<_> = (0..in_flight)
            .map(|t| {
                let (spool, body) = (spool.clone(), body.clone());
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let n = sequential + t * per_task + i;
                        spool.append(Queue::LogBlob, &record(n, &body)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let done = per_task * in_flight;
        let commits = metrics.spool_commits.get() - commits_before;
        println!(
            "spool_append: {in_flight} in flight: {done} appends in {secs:.2} s = {:.0}/s, {commits} commits ({:.1} appends per fsync)",
            done as f64 / secs,
            done as f64 / commits.max(1) as f64
        );
    });
}
