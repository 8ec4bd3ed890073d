//! The HTTP load client shared by the `relay` and `http` modes: one hyper
//! HTTP/1.1 keep-alive connection per concurrent worker (no pool, no
//! per-request allocation beyond the request head), pre-signed bodies,
//! closed loop (each worker sends its next request when the previous answer
//! has been read completely).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const PHONE: &str = "6281212345678";
const MAX_RECONNECTS_PER_WORKER: u32 = 1000;

/// One pre-signed webhook.
#[derive(Clone)]
pub struct SignedRequest {
    pub body: Bytes,
    pub signature: HeaderValue,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A valid webhook body; ids are UUID-shaped like SendTalk's.
pub fn event_body(id: &str, verified_time: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{id}","userPhone":"{PHONE}","status":"verified","verifiedTime":{verified_time}}}"#
    ))
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> HeaderValue {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let value = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    HeaderValue::from_str(&value).expect("hex is a valid header value")
}

/// A fresh, unique event id: `<run>-<worker>-<n>` padded to UUID length.
pub fn fresh_id(run: &str, worker: usize, n: u64) -> String {
    format!("{run}-{worker:04x}-{n:012x}")
}

pub fn signed(secret: &[u8], id: &str, verified_time: u64) -> SignedRequest {
    let body = event_body(id, verified_time);
    let signature = sign(secret, &body);
    SignedRequest { body, signature }
}

/// Where requests go and how the load is shaped.
#[derive(Clone)]
pub struct LoadPlan {
    /// Replicas; worker `w` keeps its connection to `addrs[w % len]`.
    pub addrs: Vec<SocketAddr>,
    pub path: String,
    pub concurrency: usize,
    /// Share of requests that repeat an id this worker already had accepted.
    pub dup_share: f64,
    /// Pre-signed requests per worker.
    pub per_worker: usize,
    /// When a worker runs out: cycle (same ids again, `http` mode) or sign
    /// new ones on the fly (`relay` mode, counted).
    pub cycle: bool,
    pub secret: Arc<Vec<u8>>,
    /// Distinguishes this run's ids from every other run.
    pub run_id: String,
}

/// What one worker (and, merged, the whole run) saw.
pub struct LoadResult {
    /// Latency (µs) of requests completed inside the measured window.
    pub hist: Histogram<u64>,
    /// Answers inside the measured window by "status result".
    pub window: BTreeMap<String, u64>,
    /// Answers over the whole run, warm-up included (for the loss check).
    pub total: BTreeMap<String, u64>,
    pub window_count: u64,
    pub signed_on_the_fly: u64,
    pub reconnects: u64,
}

impl LoadResult {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            window: BTreeMap::new(),
            total: BTreeMap::new(),
            window_count: 0,
            signed_on_the_fly: 0,
            reconnects: 0,
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.hist.add(&other.hist).expect("same bounds");
        for (k, v) in other.window {
            *self.window.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.total {
            *self.total.entry(k).or_insert(0) += v;
        }
        self.window_count += other.window_count;
        self.signed_on_the_fly += other.signed_on_the_fly;
        self.reconnects += other.reconnects;
    }

    pub fn total_of(&self, key: &str) -> u64 {
        self.total.get(key).copied().unwrap_or(0)
    }
}

/// Instants shared by all workers and the monitor.
#[derive(Clone, Copy)]
pub struct Clock {
    pub warm_end: Instant,
    pub end: Instant,
}

/// Pre-signs the pools (outside the measured time), then runs the load.
pub fn build_pools(plan: &LoadPlan) -> Vec<Vec<SignedRequest>> {
    let vt = now_ms();
    (0..plan.concurrency)
        .map(|w| {
            (0..plan.per_worker as u64)
                .map(|n| signed(&plan.secret, &fresh_id(&plan.run_id, w, n), vt))
                .collect()
        })
        .collect()
}

pub async fn run(plan: Arc<LoadPlan>, pools: Vec<Vec<SignedRequest>>, clock: Clock) -> LoadResult {
    let uri: Uri = plan.path.parse().expect("valid path");
    let mut handles = Vec::with_capacity(plan.concurrency);
    for (w, pool) in pools.into_iter().enumerate() {
        let plan = plan.clone();
        let uri = uri.clone();
        let addr = plan.addrs[w % plan.addrs.len()];
        let host = HeaderValue::from_str(&addr.to_string()).expect("valid host");
        handles.push(tokio::spawn(async move {
            worker(w, plan, addr, pool, uri, host, clock).await
        }));
    }
    let mut merged = LoadResult::new();
    for h in handles {
        match h.await {
            Ok(r) => merged.merge(r),
            Err(e) => eprintln!("loadgen: worker task failed: {e}"),
        }
    }
    merged
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Classifies an answer as "<status> <result>" (result from the JSON body).
fn classify(status: u16, body: &[u8]) -> String {
    let result = if contains(body, br#""result":"published""#) {
        "published"
    } else if contains(body, br#""result":"duplicate""#) {
        "duplicate"
    } else if contains(body, br#""result":"queued""#) {
        "queued"
    } else if let Some(code) = error_code(body) {
        return format!("{status} {code}");
    } else {
        "other"
    };
    format!("{status} {result}")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn error_code(body: &[u8]) -> Option<String> {
    let marker = br#""code":""#;
    let start = body.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let end = body[start..].iter().position(|&b| b == b'"')? + start;
    Some(String::from_utf8_lossy(&body[start..end]).into_owned())
}

struct XorShift(u64);
impl XorShift {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

async fn worker(
    w: usize,
    plan: Arc<LoadPlan>,
    addr: SocketAddr,
    pool: Vec<SignedRequest>,
    uri: Uri,
    host: HeaderValue,
    clock: Clock,
) -> LoadResult {
    let mut out = LoadResult::new();
    let sig_header = HeaderName::from_static("x-sendtalk-signature");
    let json = HeaderValue::from_static("application/json");
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x2545_F491_4F6C_DD1D));
    // Fresh requests this worker had accepted (published/queued): the
    // candidates for duplicates.
    let mut accepted: Vec<SignedRequest> = Vec::new();
    let mut next_fresh = 0usize;
    let mut fresh_n = pool.len() as u64;
    let verified_time = now_ms();
    let mut sender: Option<Sender> = None;
    let mut failures = 0u32;

    while Instant::now() < clock.end {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    failures += 1;
                    out.reconnects += 1;
                    *out.total.entry(format!("error connect: {e}")).or_insert(0) += 1;
                    if failures > MAX_RECONNECTS_PER_WORKER {
                        eprintln!(
                            "loadgen: worker {w} gives up after {failures} connection failures"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let is_dup =
            plan.dup_share > 0.0 && !accepted.is_empty() && rng.next_f64() < plan.dup_share;
        let request = if is_dup {
            accepted[rng.below(accepted.len())].clone()
        } else if next_fresh < pool.len() {
            next_fresh += 1;
            pool[next_fresh - 1].clone()
        } else if plan.cycle && !pool.is_empty() {
            next_fresh = 1;
            pool[0].clone()
        } else {
            out.signed_on_the_fly += 1;
            fresh_n += 1;
            signed(
                &plan.secret,
                &fresh_id(&plan.run_id, w, fresh_n),
                verified_time,
            )
        };

        let mut req = Request::new(Full::new(request.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.clone();
        let headers = req.headers_mut();
        headers.insert(HOST, host.clone());
        headers.insert(CONTENT_TYPE, json.clone());
        headers.insert(sig_header.clone(), request.signature.clone());

        let started = Instant::now();
        let answer = async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
        .await;
        let done = Instant::now();
        let key = match answer {
            Ok((status, body)) => {
                sender = Some(s);
                let key = classify(status, &body);
                if !is_dup
                    && (key == "200 published" || key == "202 queued")
                    && plan.dup_share > 0.0
                {
                    accepted.push(request);
                }
                key
            }
            Err(e) => {
                // The connection is unusable; the next iteration reconnects.
                out.reconnects += 1;
                format!(
                    "error {}",
                    if e.is_canceled() {
                        "canceled".to_string()
                    } else {
                        e.to_string()
                    }
                )
            }
        };
        if done >= clock.warm_end && done <= clock.end {
            let micros = done.duration_since(started).as_micros().max(1) as u64;
            let _ = out.hist.record(micros.min(120_000_000));
            out.window_count += 1;
            *out.window.entry(key.clone()).or_insert(0) += 1;
        }
        *out.total.entry(key).or_insert(0) += 1;
    }
    out
}

/// The client runtime: current-thread for 1 thread (least overhead),
/// multi-thread otherwise.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
