//! Unit tests of the verification store (the in-memory one, and the reading
//! of the webhook's dedup commit); compiled only under `#[cfg(test)]`.

use super::redis::from_dedup_commit;
use super::*;

fn store() -> MemoryStore {
    MemoryStore::new(StorePolicy {
        key_prefix: String::new(),
        ttl: Duration::from_secs(60),
        idempotency_ttl: Duration::from_secs(60),
        running_ttl: Duration::from_secs(5),
    })
}

#[test]
fn expiry_is_claimed_once_and_finished_after_the_event() {
    let s = store();
    let now = now_ms();
    s.create_pending(&Record::pending("a", "628100", now - 10, now - 1));
    assert_eq!(s.due(now, 10), vec!["a".to_string()]);
    let lease = Duration::from_secs(30);
    assert!(matches!(
        s.claim_expiry("a", now, lease, "t1"),
        ExpiryClaim::Claimed(_)
    ));
    assert_eq!(s.claim_expiry("a", now, lease, "t2"), ExpiryClaim::Busy);
    s.finish_expiry("a", "t1");
    assert_eq!(s.claim_expiry("a", now, lease, "t2"), ExpiryClaim::Done);
    assert_eq!(s.get("a").unwrap().status, Status::Expired);
    assert!(s.due(now, 10).is_empty());
}

#[test]
fn a_lost_lease_lets_another_claim() {
    let s = store();
    let now = now_ms();
    s.create_pending(&Record::pending("b", "628100", now - 10, now - 1));
    let lease = Duration::from_millis(100);
    assert!(matches!(
        s.claim_expiry("b", now, lease, "t1"),
        ExpiryClaim::Claimed(_)
    ));
    assert!(matches!(
        s.claim_expiry("b", now + 200, lease, "t2"),
        ExpiryClaim::Claimed(_)
    ));
}

#[test]
fn idempotency_keys_replay_refuse_and_report_running() {
    let s = store();
    assert_eq!(s.idem_begin("k", "f1"), IdemBegin::Started);
    assert_eq!(s.idem_begin("k", "f1"), IdemBegin::Running);
    assert_eq!(s.idem_begin("k", "f2"), IdemBegin::Reused);
    let answer = StoredAnswer {
        status: 201,
        body: "{}".into(),
        location: None,
    };
    s.idem_finish("k", "f1", &answer);
    assert_eq!(s.idem_begin("k", "f1"), IdemBegin::Done(answer));
}

#[test]
fn dedup_commits_read_as_verified_records() {
    let r = from_dedup_commit("x", r#"{"status":"verified","verifiedTime":5}"#).unwrap();
    assert_eq!(r.status, Status::Verified);
    assert_eq!(r.verified_time_ms, Some(5));
    assert!(from_dedup_commit("x", "lease:abc").is_none());
}
