//! Unit tests of the spool: durability, order, limits and deduplication state.

use super::*;
use bytes::Bytes;
use redb::ReadableTableMetadata;

fn record(id: Option<&str>, body: &'static [u8]) -> Record {
    Record {
        arrival_ms: 1,
        client_ip: "192.0.2.1".into(),
        method: "POST".into(),
        target: "/log/cadmium/logblob/1".into(),
        content_type: None,
        dedupe_key: id.map(str::to_string),
        body: Bytes::from_static(body),
    }
}

fn open(dir: &Path, max: u64) -> Spool {
    Spool::open(dir, max, 600_000, Arc::new(Metrics::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_spool_lets_another_open_it_and_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let old = open(dir.path(), 1 << 20);
    old.append(Queue::LogBlob, &record(Some("kept"), b"kept"))
        .await
        .unwrap();
    assert!(matches!(
        Spool::open(dir.path(), 1 << 20, 600_000, Arc::new(Metrics::new())),
        Err(SpoolError::InUse(_))
    ));
    let old = Arc::new(old);
    let o = old.clone();
    tokio::task::spawn_blocking(move || o.hand_over_blocking())
        .await
        .unwrap()
        .unwrap();
    assert!(old.is_handed_over());
    // The old handle still exists; the store is free for the next process anyway.
    let new = open(dir.path(), 1 << 20);
    assert_eq!(new.depth(Queue::LogBlob).entries, 1);
    assert!(old
        .append(Queue::LogBlob, &record(None, b"late"))
        .await
        .is_err());
    assert!(matches!(
        old.oldest_blocking(Queue::LogBlob),
        Err(SpoolError::HandedOver)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_reopening_in_order_and_finish_removes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path(), 1 << 20);
        for body in [&b"one"[..], b"two", b"three"] {
            let leaked: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
            assert!(matches!(
                spool
                    .append(Queue::LogBlob, &record(None, leaked))
                    .await
                    .unwrap(),
                Appended::Stored(_)
            ));
        }
        assert_eq!(spool.depth(Queue::LogBlob).entries, 3);
    }
    let spool = open(dir.path(), 1 << 20);
    assert_eq!(
        spool.depth(Queue::LogBlob).entries,
        3,
        "counted again at open"
    );
    let mut seen = Vec::new();
    while let Some(w) = spool.oldest_blocking(Queue::LogBlob).unwrap() {
        seen.push(w.record.unwrap().body.clone());
        spool
            .finish(Queue::LogBlob, w.seq, w.len, None, Finished::Dead)
            .await
            .unwrap();
    }
    assert_eq!(
        seen,
        vec![
            Bytes::from_static(b"one"),
            Bytes::from_static(b"two"),
            Bytes::from_static(b"three")
        ]
    );
    assert_eq!(spool.depth(Queue::LogBlob).entries, 0);
    assert_eq!(spool.depth(Queue::LogBlob).bytes, 0);
    assert!(spool.oldest_blocking(Queue::Events).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 200);
    let mut stored = 0;
    loop {
        match spool
            .append(
                Queue::Events,
                &record(None, b"0123456789012345678901234567890123456789"),
            )
            .await
        {
            Ok(_) => stored += 1,
            Err(SpoolError::Full) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(stored < 100);
    }
    assert!(stored >= 1);
    assert!(spool.depth(Queue::Events).bytes <= 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_spooled_once_and_answers_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let first = spool
        .append(Queue::Events, &record(Some("r1"), b"x"))
        .await
        .unwrap();
    let Appended::Stored(seq) = first else {
        panic!()
    };
    assert_eq!(
        spool
            .append(Queue::Events, &record(Some("r1"), b"x"))
            .await
            .unwrap(),
        Appended::Duplicate
    );
    assert_eq!(spool.depth(Queue::Events).entries, 1);
    let answer = StoredAnswer {
        at_ms: unix_ms(),
        status: 200,
        content_type: None,
        body: Bytes::from_static(b"ok"),
    };
    let len = spool.oldest_blocking(Queue::Events).unwrap().unwrap().len;
    spool
        .finish(
            Queue::Events,
            seq,
            len,
            Some("r1".into()),
            Finished::Delivered(answer.clone()),
        )
        .await
        .unwrap();
    assert_eq!(
        spool.delivered_blocking(Queue::Events, "r1", unix_ms(), 60_000),
        Some(answer)
    );
    assert_eq!(
        spool.delivered_blocking(Queue::LogBlob, "r1", unix_ms(), 60_000),
        None,
        "ids are per queue"
    );
    assert_eq!(
        spool.delivered_blocking(Queue::Events, "r1", unix_ms() + 120_000, 60_000),
        None,
        "window over"
    );
    // Delivered within the dedupe window: a retry is not stored again.
    assert_eq!(
        spool
            .append(Queue::Events, &record(Some("r1"), b"x"))
            .await
            .unwrap(),
        Appended::Duplicate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Arc::new(Spool::open(dir.path(), 1 << 30, 600_000, metrics.clone()).unwrap());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let s = spool.clone();
            tokio::spawn(async move {
                s.append(Queue::LogBlob, &record(None, b"blob"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(spool.depth(Queue::LogBlob).entries, 200);
    assert!(
        metrics.spool_commits.get() < 200,
        "{} commits for 200 appends",
        metrics.spool_commits.get()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_file_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spool.redb"), vec![0xA5u8; 10_000]).unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(dir.path(), 1 << 20, 600_000, metrics.clone()).unwrap();
    assert_eq!(metrics.spool_corrupt.get(), 1);
    assert!(spool
        .append(Queue::Events, &record(None, b"x"))
        .await
        .is_ok());
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.redb.damaged-")
        })
        .count();
    assert_eq!(aside, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_forgets_only_expired_answers() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    let answer = |at_ms| StoredAnswer {
        at_ms,
        status: 200,
        content_type: None,
        body: Bytes::new(),
    };
    spool
        .remember(Queue::Events, "old".into(), answer(1_000))
        .await
        .unwrap();
    spool
        .remember(Queue::Events, "new".into(), answer(9_000))
        .await
        .unwrap();
    spool
        .remember(Queue::Events, "again".into(), answer(1_000))
        .await
        .unwrap();
    spool
        .remember(Queue::Events, "again".into(), answer(9_500))
        .await
        .unwrap();
    spool.purge(5_000).await.unwrap();
    let has = |id: &str| {
        spool
            .delivered_blocking(Queue::Events, id, 10_000, u64::MAX)
            .is_some()
    };
    assert!(!has("old"));
    assert!(has("new"));
    assert!(has("again"), "delivered again after the cut-off: kept");
}

fn answer(at_ms: u64, body_len: usize) -> StoredAnswer {
    StoredAnswer {
        at_ms,
        status: 200,
        content_type: Some("application/json".into()),
        body: Bytes::from(vec![b'a'; body_len]),
    }
}

/// Remembers `n` event answers `id-{from}`.. stored at `at_ms(i)`, many at a time (so
/// they share commits, as under load).
async fn remember_many(
    spool: &Arc<Spool>,
    from: usize,
    n: usize,
    body_len: usize,
    at_ms: impl Fn(usize) -> u64,
) {
    let tasks: Vec<_> = (from..from + n)
        .map(|i| {
            let (s, a) = (spool.clone(), answer(at_ms(i), body_len));
            tokio::spawn(async move { s.remember(Queue::Events, format!("id-{i}"), a).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_forgets_every_expired_answer_however_many() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(open(dir.path(), 1 << 30));
    // A minute of answers at 200 a second: several purge chunks, and more than the
    // 10,000 a purge once removed (every minute).
    let expired = 12_000;
    remember_many(&spool, 0, expired, 20, |i| 1_000 + i as u64).await;
    remember_many(&spool, expired, 100, 20, |_| 90_000).await;
    assert_eq!(spool.kept().answers.entries, expired as u64 + 100);
    let went_through = spool.purge(50_000).await.unwrap();
    assert_eq!(went_through, expired as u64);
    assert!(went_through > PURGE_CHUNK as u64);
    assert_eq!(
        spool.kept().answers.entries,
        100,
        "every expired answer purged"
    );
    let has = |id: usize| {
        spool
            .delivered_blocking(Queue::Events, &format!("id-{id}"), 90_000, u64::MAX)
            .is_some()
    };
    assert!(!has(0) && !has(expired - 1));
    assert!(has(expired) && has(expired + 99));
    // What is left is what a recount at open finds.
    let kept = spool.kept();
    drop(Arc::into_inner(spool).unwrap());
    assert_eq!(open(dir.path(), 1 << 30).kept(), kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_dead_letters_stay_within_their_share_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let max = 256 << 10;
    let metrics = Arc::new(Metrics::new());
    let spool = Arc::new(Spool::open(dir.path(), max, 600_000, metrics.clone()).unwrap());
    let cap = max / KEPT_SHARE;
    // 5,000 answers of about 150 bytes: three times the answers' share.
    remember_many(&spool, 0, 5_000, 100, |i| 1_000 + i as u64).await;
    let kept = spool.kept();
    assert!(kept.answers.bytes <= cap, "{kept:?}");
    assert!(kept.answers.bytes > cap - 1_000, "{kept:?}");
    assert!(metrics.spool_answers.evicted.get() > 3_000);
    let has = |id: usize| {
        spool
            .delivered_blocking(Queue::Events, &format!("id-{id}"), 10_000, u64::MAX)
            .is_some()
    };
    assert!(!has(0), "the oldest answer went first");
    assert!(has(4_999), "the newest answer is kept");

    // 400 dead letters of about 500 bytes: far more than their share.
    let body: &'static [u8] = Box::leak(vec![b'd'; 400].into_boxed_slice());
    let appends: Vec<_> = (0..400)
        .map(|_| {
            let s = spool.clone();
            tokio::spawn(async move { s.append(Queue::LogBlob, &record(None, body)).await })
        })
        .collect();
    for a in appends {
        assert!(matches!(a.await.unwrap(), Ok(Appended::Stored(_))));
    }
    while let Some(w) = spool.oldest_blocking(Queue::LogBlob).unwrap() {
        spool
            .finish(Queue::LogBlob, w.seq, w.len, None, Finished::Dead)
            .await
            .unwrap();
    }
    let kept = spool.kept();
    assert!(kept.dead_letters.bytes <= cap, "{kept:?}");
    assert!(kept.dead_letters.entries >= 10, "{kept:?}");
    assert_eq!(
        metrics.spool_dead_letters.evicted.get(),
        400 - kept.dead_letters.entries
    );

    // Undelivered records take what they need; the kept entries make room.
    let appends: Vec<_> = (0..1_000)
        .map(|_| {
            let s = spool.clone();
            tokio::spawn(async move { s.append(Queue::Events, &record(None, body)).await })
        })
        .collect();
    let mut stored = 0;
    for a in appends {
        match a.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e) => assert!(matches!(e, SpoolError::Full), "{e}"),
        }
    }
    assert!(stored < 1_000, "the limit was reached");
    spool.flush().await.unwrap(); // a commit after the last append, to trim once more
    let records = spool.depth(Queue::Events).bytes;
    let kept = spool.kept();
    assert!(
        records > max - 1_000,
        "records may use the whole limit: {records}"
    );
    assert!(
        records + kept.answers.bytes + kept.dead_letters.bytes <= max,
        "{records} + {kept:?} > {max}"
    );
    assert_eq!(
        spool.depth(Queue::Events).entries,
        stored,
        "no record dropped"
    );
    // Counted again at open.
    drop(Arc::into_inner(spool).unwrap());
    assert_eq!(open(dir.path(), max).kept(), kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_kept_as_its_status_alone() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 30);
    spool
        .remember(
            Queue::Events,
            "small".into(),
            answer(5, MAX_KEPT_ANSWER_BODY),
        )
        .await
        .unwrap();
    spool
        .remember(Queue::Events, "large".into(), answer(5, 1 << 20))
        .await
        .unwrap();
    let get = |id: &str| {
        spool
            .delivered_blocking(Queue::Events, id, 10, u64::MAX)
            .unwrap()
    };
    assert_eq!(get("small"), answer(5, MAX_KEPT_ANSWER_BODY));
    let large = get("large");
    assert_eq!(
        (large.status, large.content_type, large.body.len()),
        (200, None, 0)
    );
    assert!(spool.kept().answers.bytes < 2 * MAX_KEPT_ANSWER_BODY as u64 + 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_survive_reopening_and_leave_with_their_record() {
    let dir = tempfile::tempdir().unwrap();
    let failures = Failures {
        answered: 2,
        tries: 5,
        first_ms: 1_234,
    };
    let seq = {
        let spool = open(dir.path(), 1 << 20);
        spool
            .append(Queue::Events, &record(Some("poison"), b"x"))
            .await
            .unwrap();
        let w = spool.oldest_blocking(Queue::Events).unwrap().unwrap();
        assert_eq!(w.failures, Failures::default());
        assert_eq!(spool.oldest_age_ms(Queue::Events, 1_001), 1_000);
        spool.note_failures(w.seq, failures).await.unwrap();
        // A graceful stop flushes; the failures are not written with an fsync of their own.
        spool.flush().await.unwrap();
        w.seq
    };
    let spool = open(dir.path(), 1 << 20);
    let w = spool.oldest_blocking(Queue::Events).unwrap().unwrap();
    assert_eq!(
        (w.seq, w.failures),
        (seq, failures),
        "kept across a restart"
    );
    assert_eq!(
        spool.oldest_age_ms(Queue::Events, 1_001),
        1_000,
        "read at open"
    );
    spool
        .finish(
            Queue::Events,
            w.seq,
            w.len,
            Some("poison".into()),
            Finished::Dead,
        )
        .await
        .unwrap();
    // Failures of a record no longer waiting are neither kept nor left behind.
    spool.note_failures(w.seq, failures).await.unwrap();
    spool.flush().await.unwrap();
    let read = spool.db().unwrap().begin_read().unwrap();
    assert!(read.open_table(FAILURES).unwrap().is_empty().unwrap());
    assert_eq!(spool.oldest_age_ms(Queue::Events, 1_001), 0, "none waits");
    assert_eq!(spool.kept().dead_letters.entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_left_by_a_crash_opens_without_a_full_repair() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path(), 1 << 20);
    for id in ["a", "b", "c"] {
        spool
            .append(Queue::Events, &record(Some(id), b"event"))
            .await
            .unwrap();
    }
    // Removals commit without an fsync; the acknowledged appends are on disk. A copy of
    // the file while the spool is open is what a kill -9 leaves.
    let head = spool.oldest_blocking(Queue::Events).unwrap().unwrap();
    spool
        .finish(Queue::Events, head.seq, head.len, None, Finished::Dead)
        .await
        .unwrap();
    let crashed = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join(FILE_NAME), crashed.path().join(FILE_NAME)).unwrap();
    let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = repaired.clone();
    let mut builder = Database::builder();
    builder.set_repair_callback(move |_| flag.store(true, Ordering::SeqCst));
    let db = builder.create(crashed.path().join(FILE_NAME)).unwrap();
    assert!(
        !repaired.load(Ordering::SeqCst),
        "a full repair walks the whole store: its time grows with the spool"
    );
    let read = db.begin_read().unwrap();
    let events = read.open_table(EVENTS).unwrap();
    assert!(
        events.len().unwrap() >= 2,
        "the acknowledged appends are there"
    );
}
