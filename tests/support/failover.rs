#![allow(clippy::unwrap_used)]
//! Load and oracle for Redis failover tests: every fresh id is sent twice
//! (to one relay, then to the next, as a sender's retry would), every answer
//! is kept with its time, and every delivery is counted per id, so a test
//! can say which ids were lost (none may be) and which were duplicated (only
//! those SPEC 3 allows: a forgotten key).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{
    event_body, header, message_ids, try_post_signed, unique, Answer, TestApp, TestConsumer,
};

/// One webhook request and its answer.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: String,
    pub posted_at: Instant,
    pub answered_at: Instant,
    pub status: u16,
    pub result: String,
}

impl Sent {
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends fresh ids from `workers` concurrent senders until `until`, each id
/// to `urls[k]` and then to `urls[k + 1]`. Every request is answered (the
/// relays stay up); a 409 (a lease that survived the failover) is kept as
/// an answer like any other.
pub async fn pair_load(urls: Vec<String>, until: Instant, workers: usize) -> Vec<Sent> {
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            let urls = urls.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut k = w;
                while Instant::now() < until {
                    let id = unique(&format!("pair{w}"));
                    let body = event_body(&id);
                    for url in [&urls[k % urls.len()], &urls[(k + 1) % urls.len()]] {
                        let sent = Instant::now();
                        let a = try_post_signed(&client, url, &body)
                            .await
                            .expect("the relay answers");
                        seen.push(Sent {
                            id: id.clone(),
                            posted_at: sent,
                            answered_at: Instant::now(),
                            status: a.status,
                            result: if a.result().is_empty() {
                                a.code().to_string()
                            } else {
                                a.result().to_string()
                            },
                        });
                    }
                    k += 1;
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// After a master was killed at `killed`: posts a fresh id from `pick` and
/// then the same id again, every 100 ms, until the second answer is
/// `duplicate` (the claim and the commit both worked on the new master).
/// Returns the time from the kill to the first answer of that pair.
pub async fn time_to_dedup_again(
    url: &str,
    killed: Instant,
    pick: impl Fn() -> String,
    within: Duration,
) -> (Duration, Vec<Sent>) {
    let client = reqwest::Client::new();
    let mut probes = Vec::new();
    loop {
        assert!(
            killed.elapsed() < within,
            "dedup did not work again within {within:?} of the kill"
        );
        let id = pick();
        let body = event_body(&id);
        let sent = Instant::now();
        let first = try_post_signed(&client, url, &body).await.unwrap();
        let answered = Instant::now();
        probes.push(Sent {
            id: id.clone(),
            posted_at: sent,
            answered_at: answered,
            status: first.status,
            result: first.result().to_string(),
        });
        let again_sent = Instant::now();
        let again = try_post_signed(&client, url, &body).await.unwrap();
        probes.push(Sent {
            id,
            posted_at: again_sent,
            answered_at: Instant::now(),
            status: again.status,
            result: again.result().to_string(),
        });
        if again.result() == "duplicate" {
            return (answered - killed, probes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The failover oracle of SPEC 3: collects what reached the queue for the
/// `accepted` ids, prints the run's figures under `label`, asserts that no
/// accepted id was lost, and returns the deliveries and the ids seen twice.
pub async fn delivered_without_loss(
    label: &str,
    consumer: &mut TestConsumer,
    sent: &[Sent],
    accepted: &HashSet<String>,
) -> (Delivered, Vec<String>) {
    let delivered = Delivered::collect(consumer, accepted, Duration::from_secs(30)).await;
    let lost = delivered.lost(accepted);
    let dup = delivered.duplicated();
    eprintln!(
        "{label} failover load: {} requests, {} ids accepted, {} delivered copies without a dedup check, {} ids duplicated, answers {:?}",
        sent.len(),
        accepted.len(),
        delivered.skipped(),
        dup.len(),
        answer_counts(sent)
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    (delivered, dup)
}

/// What reached the broker: per id, the `x-dedup` header of every copy.
#[derive(Debug, Default)]
pub struct Delivered {
    pub copies: HashMap<String, Vec<String>>,
}

impl Delivered {
    /// Consumes until every id in `expected` has arrived (or `within`
    /// passed), then until the queue is quiet for a second, to catch extras.
    pub async fn collect(
        consumer: &mut TestConsumer,
        expected: &HashSet<String>,
        within: Duration,
    ) -> Delivered {
        let mut me = Delivered::default();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && !expected.iter().all(|id| me.copies.contains_key(id)) {
            if let Some(d) = consumer.next(Duration::from_millis(500)).await {
                me.add(&d);
            }
        }
        for d in consumer.drain(Duration::from_secs(1)).await {
            me.add(&d);
        }
        me
    }

    fn add(&mut self, d: &lapin::message::Delivery) {
        let id = message_ids(std::slice::from_ref(d))[0].clone();
        let mark = header(d, "x-dedup").unwrap_or_default();
        self.copies.entry(id).or_default().push(mark);
    }

    pub fn lost<'a>(&self, accepted: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        accepted
            .into_iter()
            .filter(|id| !self.copies.contains_key(*id))
            .cloned()
            .collect()
    }

    pub fn duplicated(&self) -> Vec<String> {
        self.copies
            .iter()
            .filter(|(_, c)| c.len() > 1)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many copies went out without a dedup check (Redis unavailable).
    pub fn skipped(&self) -> usize {
        self.copies
            .values()
            .flatten()
            .filter(|m| *m == "skipped")
            .count()
    }
}

/// The ids with at least one 2xx answer.
pub fn accepted_ids(sent: &[Sent]) -> HashSet<String> {
    sent.iter()
        .filter(|s| s.accepted())
        .map(|s| s.id.clone())
        .collect()
}

/// The ids whose first request went out after `after`.
pub fn ids_first_sent_after(sent: &[Sent], after: Instant) -> HashSet<String> {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for s in sent {
        let e = first.entry(s.id.as_str()).or_insert(s.posted_at);
        if s.posted_at < *e {
            *e = s.posted_at;
        }
    }
    first
        .into_iter()
        .filter(|(_, t)| *t > after)
        .map(|(id, _)| id.to_string())
        .collect()
}

/// Answers counted by kind, for the test's report.
pub fn answer_counts(sent: &[Sent]) -> Vec<(String, usize)> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in sent {
        *counts
            .entry(format!("{} {}", s.status, s.result))
            .or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort();
    v
}

/// Posts `body` to `app`, again while the answer is 409 (the dedup commit
/// runs after the answer, so another replica may still meet the lease for a
/// moment), as a sender's retry would.
pub async fn post_settled(app: &TestApp, body: &str) -> Answer {
    for _ in 0..100 {
        let a = app.post(body).await;
        if a.status != 409 {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("still in flight after 2 s");
}
