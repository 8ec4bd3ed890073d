//! Unit tests of the spool; compiled only under `#[cfg(test)]` (see `mod.rs`).

use super::*;
use crate::message::DedupMark;
use bytes::Bytes;

fn metrics() -> SpoolMetrics {
    SpoolMetrics {
        depth: IntGauge::new("d", "d").unwrap(),
        bytes: IntGauge::new("b", "b").unwrap(),
        errors: IntCounter::new("e", "e").unwrap(),
    }
}

fn envelope(id: &str) -> Envelope {
    Envelope {
        body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        message_id: id.into(),
        status: "verified".into(),
        request_id: "r".into(),
        received_at_ms: 1,
        dedup: DedupMark::Checked,
        verification_id: None,
        phone_match: None,
    }
}

/// Opens the spool in `dir` once the previous handle's writer has let go.
async fn reopen(dir: &std::path::Path) -> Spool {
    for _ in 0..100 {
        match Spool::open(dir, 1 << 20, metrics()) {
            Ok(spool) => return spool,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Spool::open(dir, 1 << 20, metrics()).unwrap()
}

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4()))
}

#[tokio::test]
async fn appended_entries_survive_reopening_in_order() {
    let dir = temp_dir();
    {
        let spool = Spool::open(&dir, 1 << 20, metrics()).unwrap();
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
    let spool = Spool::open(&dir, 300, metrics()).unwrap();
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
    let spool = Spool::open(&dir, 1 << 20, metrics()).unwrap();
    spool
        .append(&envelope("refused"), Spooled::Refused)
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
    let waits: Vec<_> = (0..8).map(|_| spool.back_off(0).as_secs()).collect();
    assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_entry_awaiting_a_late_confirm_is_not_drained() {
    let dir = temp_dir();
    let spool = Spool::open(&dir, 1 << 20, metrics()).unwrap();
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
