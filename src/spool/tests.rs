//! Unit tests of the spool; compiled only under `#[cfg(test)]` (see `mod.rs`).

use super::*;
use crate::message::DedupMark;
use bytes::Bytes;

fn metrics() -> SpoolMetrics {
    SpoolMetrics {
        depth: IntGauge::new("d", "d").unwrap(),
        bytes: IntGauge::new("b", "b").unwrap(),
        errors: IntCounter::new("e", "e").unwrap(),
        dead: IntGauge::new("x", "x").unwrap(),
        dead_total: IntCounter::new("t", "t").unwrap(),
        oldest_age: IntGauge::new("o", "o").unwrap(),
    }
}

fn envelope(id: &str) -> Envelope {
    Envelope {
        body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        message_id: id.into(),
        status: "verified".into(),
        request_id: "r".into(),
        received_at_ms: now_ms(),
        dedup: DedupMark::Checked,
        verification_id: None,
        phone_match: None,
    }
}

/// Opens the spool in `dir` once the previous handle's writer has let go.
async fn reopen(dir: &std::path::Path) -> Spool {
    reopen_with(dir, Limits::bytes(1 << 20)).await
}

async fn reopen_with(dir: &std::path::Path, limits: Limits) -> Spool {
    for _ in 0..100 {
        match Spool::open(dir, limits, metrics()) {
            Ok(spool) => return spool,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Spool::open(dir, limits, metrics()).unwrap()
}

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4()))
}

#[tokio::test]
async fn appended_entries_survive_reopening_in_order() {
    let dir = temp_dir();
    {
        let spool = Spool::open(&dir, Limits::bytes(1 << 20), metrics()).unwrap();
        for i in 0..5 {
            spool
                .append(&envelope(&format!("e{i}")), Spooled::BrokerUnavailable)
                .await
                .unwrap();
        }
        assert_eq!(spool.depth(), 5);
    }
    // The writer thread holds the database until its channel closes; on a
    // busy machine it may take a moment to notice.
    let spool = reopen(&dir).await;
    assert_eq!(spool.depth(), 5);
    let oldest = spool.oldest(10).unwrap();
    let ids: Vec<_> = oldest.iter().map(|(_, e)| e.message_id.clone()).collect();
    assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
    spool.remove(&[oldest[0].0]).await.unwrap();
    assert_eq!(spool.stored_len().unwrap(), 4);
    assert_eq!(spool.depth(), 4);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_full_spool_refuses_appends() {
    let dir = temp_dir();
    let spool = Spool::open(&dir, Limits::bytes(300), metrics()).unwrap();
    spool
        .append(&envelope("a"), Spooled::BrokerUnavailable)
        .await
        .unwrap();
    let mut refused = false;
    for i in 0..10 {
        if matches!(
            spool
                .append(&envelope(&format!("x{i}")), Spooled::BrokerUnavailable)
                .await,
            Err(SpoolError::Full { .. })
        ) {
            refused = true;
            break;
        }
    }
    assert!(refused);
    assert!(spool.bytes() <= 300);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_refused_entry_waits_longer_after_each_refusal() {
    let dir = temp_dir();
    let spool = Spool::open(&dir, Limits::bytes(1 << 20), metrics()).unwrap();
    spool
        .append(&envelope("refused"), Spooled::Refused("nacked".into()))
        .await
        .unwrap();
    spool
        .append(&envelope("fresh"), Spooled::BrokerUnavailable)
        .await
        .unwrap();
    // The refused entry is held back; the one behind it is not blocked.
    let ids: Vec<_> = spool
        .oldest(10)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.message_id)
        .collect();
    assert_eq!(ids, ["fresh"]);
    let nack = crate::publish::PublishError::Nack;
    let refused = envelope("refused");
    let waits: Vec<_> = (0..8)
        .map(|_| spool.refused(0, &refused, &nack).unwrap().as_secs())
        .collect();
    assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Waits until the writer has committed what was sent without waiting.
async fn settled(spool: &Spool, dead: u64) {
    for _ in 0..100 {
        if spool.dead() == dead {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spool.dead(), dead);
}

#[tokio::test]
async fn an_entry_refused_max_attempts_times_is_dead_and_stays_dead_after_a_restart() {
    let dir = temp_dir();
    let limits = Limits {
        max_attempts: 3,
        ..Limits::bytes(1 << 20)
    };
    {
        let spool = Spool::open(&dir, limits, metrics()).unwrap();
        let refused = envelope("refused");
        spool
            .append(&refused, Spooled::Refused("nacked".into()))
            .await
            .unwrap();
        let nack = crate::publish::PublishError::Nack;
        assert!(spool.refused(0, &refused, &nack).is_some());
        assert!(spool.refused(0, &refused, &nack).is_none(), "third refusal");
        settled(&spool, 1).await;
        let page = spool
            .page(PageQuery {
                state: Some(EntryState::Dead),
                after: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(page.entries.len(), 1);
        assert_eq!(page.entries[0].summary(String::new()).attempts(), 3);
    }
    let spool = reopen_with(&dir, limits).await;
    assert_eq!((spool.depth(), spool.dead()), (1, 1));
    // Dead: never handed to the drainer, whatever time passes.
    assert!(spool.oldest(10).unwrap().is_empty());
    // Retried by an operator: waiting again, attempts reset, drained.
    assert!(matches!(spool.retry(0).await.unwrap(), Found::Done(_)));
    assert_eq!(spool.dead(), 0);
    assert_eq!(spool.oldest(10).unwrap().len(), 1);
    // Dropped: gone, and nothing is left to publish.
    assert!(matches!(spool.drop_entry(0).await.unwrap(), Found::Done(_)));
    assert!(matches!(spool.drop_entry(0).await.unwrap(), Found::Missing));
    assert_eq!((spool.depth(), spool.stored_len().unwrap()), (0, 0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_entry_older_than_max_age_is_dead_until_retried() {
    let dir = temp_dir();
    let limits = Limits {
        max_age: Some(Duration::from_secs(60)),
        ..Limits::bytes(1 << 20)
    };
    let spool = Spool::open(&dir, limits, metrics()).unwrap();
    let mut old = envelope("old");
    old.received_at_ms = 1;
    spool
        .append(&old, Spooled::BrokerUnavailable)
        .await
        .unwrap();
    assert!(spool.oldest(10).unwrap().is_empty());
    settled(&spool, 1).await;
    assert!(spool.oldest_age() > Duration::from_secs(86_400));
    assert!(matches!(spool.retry(0).await.unwrap(), Found::Done(_)));
    // Its age counts from the retry now.
    assert_eq!(spool.oldest(10).unwrap().len(), 1);
    assert_eq!(spool.dead(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_entry_awaiting_a_late_confirm_is_not_drained() {
    let dir = temp_dir();
    let spool = Spool::open(&dir, Limits::bytes(1 << 20), metrics()).unwrap();
    spool.set_hold(0, Hold::Pending);
    spool
        .append(&envelope("pending"), Spooled::BrokerUnavailable)
        .await
        .unwrap();
    assert!(spool.oldest(10).unwrap().is_empty());
    spool.clear_hold(0);
    assert_eq!(spool.oldest(10).unwrap().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}
