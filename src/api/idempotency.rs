//! `Idempotency-Key` on POST: the same key with the same body gets the stored answer (the
//! action is not done twice); the same key with another body is refused (422). Keys are per
//! caller (the verified token subject) and kept for `ttl`.
//!
//! - Requests without a valid token are not remembered at all (they are refused anyway), and
//!   neither are 401 and 403 answers.
//! - At most [`MAX_ENTRIES`] keys are kept (past that the oldest answers are forgotten), and
//!   an answer whose body is over [`MAX_STORED_BYTES`] is not kept (a retry runs again).
//!   Answers expire in the order they were stored, from a queue, not by scanning every key.
//!
//! - Only final answers are stored. A 429 (rate limited), a 408, and any 5xx (unavailable,
//!   timed out) say "not now", so a retry with the same key runs the request again.
//! - A key is held while its request runs: a second request with the same key waits for
//!   the first to finish, then gets its stored answer (or, when the first's answer was not
//!   final, runs itself). The wait is bounded by the request timeout like any request.

use super::envelope::{ApiError, Outcome};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A final answer, kept for `ttl`.
struct Stored {
    status: StatusCode,
    outcome: Outcome,
    at: Instant,
}

enum Slot {
    /// A request with this key is running; the receiver wakes when it is done.
    Running(watch::Receiver<()>),
    Done(Stored),
}

struct Record {
    request_hash: u64,
    slot: Slot,
}

type Key = (String, String);

/// Keys remembered at once, over all callers.
pub const MAX_ENTRIES: usize = 10_000;
/// The largest answer body kept.
pub const MAX_STORED_BYTES: usize = 64 * 1024;

pub struct Idempotency {
    entries: DashMap<Key, Record>,
    /// Stored answers, oldest first, with when each was stored.
    order: std::sync::Mutex<std::collections::VecDeque<(Instant, Key)>>,
    ttl: Duration,
    body_limit: usize,
    /// Verifies callers' tokens; without it (unit tests), the Authorization header itself
    /// names the caller.
    keys: Option<super::auth::Keys>,
    max_entries: usize,
}

impl Idempotency {
    pub fn new(ttl: Duration, body_limit: usize) -> Idempotency {
        Idempotency {
            entries: DashMap::new(),
            order: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ttl,
            body_limit,
            keys: None,
            max_entries: MAX_ENTRIES,
        }
    }

    /// Keys answers by the subject of a token these keys verify.
    pub fn verifying_with(mut self, keys: super::auth::Keys) -> Idempotency {
        self.keys = Some(keys);
        self
    }

    /// Who is calling, when they can be told: a verified token's subject.
    fn caller(&self, authorization: Option<&HeaderValue>) -> Option<String> {
        let header = authorization?.to_str().ok()?;
        match &self.keys {
            Some(keys) => {
                let token = header.strip_prefix("Bearer ")?;
                keys.verify(token.trim()).ok().map(|c| c.sub)
            }
            None => Some(header.to_string()),
        }
    }

    /// Forgets expired answers, oldest first, and past `max_entries`, the oldest answers
    /// even if not expired. Returns whether there is room for another key.
    fn make_room(&self) -> bool {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, key)) = order.front() {
            let full = self.entries.len() >= self.max_entries;
            if !full && at.elapsed() < self.ttl {
                break;
            }
            let at = *at;
            // Only the answer stored then: the key may have been stored again since.
            self.entries
                .remove_if(key, |_, e| matches!(&e.slot, Slot::Done(s) if s.at == at));
            order.pop_front();
        }
        self.entries.len() < self.max_entries
    }

    fn store(&self, key: Key, record: Record, at: Instant) {
        self.entries.insert(key.clone(), record);
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        order.push_back((at, key));
    }
}

/// About how many bytes an answer's body takes.
fn size_of(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Reply { message, data } => message.len() + data.to_string().len(),
        Outcome::Error(e) => e.message.len() + e.details.to_string().len(),
    }
}

/// Whether an answer is the request's outcome, rather than "not now" (or "not you": 401
/// and 403 are not kept either).
fn is_final(status: StatusCode) -> bool {
    !(status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error())
}

fn hash_of(parts: impl Hash) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(parts)
}

/// What to do with a request whose key has been seen.
enum Seen {
    Replay(Response),
    Wait(watch::Receiver<()>),
    Run(watch::Sender<()>),
}

/// Holds a key while its request runs. Dropped (the request done, or abandoned when the
/// client went away), it lets go of the key unless a final answer was stored, and wakes
/// the requests waiting for it.
struct Running<'a> {
    store: &'a Idempotency,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.store
            .entries
            .remove_if(&self.key, |_, e| matches!(e.slot, Slot::Running(_)));
    }
}

fn reused() -> Response {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "IDEMPOTENCY_KEY_REUSED",
        "this Idempotency-Key was used with another request",
    )
    .into_response()
}

impl Idempotency {
    /// The stored answer, a running request to wait for, or the go-ahead to run (the key
    /// is then held).
    fn claim(&self, key: &Key, request_hash: u64) -> Seen {
        // Counted before the entry is held: `len` reads every shard, the entry's included.
        let full = self.entries.len() >= self.max_entries;
        match self.entries.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                let expired = matches!(&e.get().slot, Slot::Done(s) if s.at.elapsed() >= self.ttl);
                if expired {
                    let (tx, rx) = watch::channel(());
                    e.insert(Record {
                        request_hash,
                        slot: Slot::Running(rx),
                    });
                    return Seen::Run(tx);
                }
                if e.get().request_hash != request_hash {
                    return Seen::Replay(reused());
                }
                match &e.get().slot {
                    Slot::Running(rx) => Seen::Wait(rx.clone()),
                    Slot::Done(stored) => {
                        let mut response = stored.status.into_response();
                        response.extensions_mut().insert(stored.outcome.clone());
                        response
                            .headers_mut()
                            .insert("idempotent-replayed", HeaderValue::from_static("true"));
                        Seen::Replay(response)
                    }
                }
            }
            Entry::Vacant(v) => {
                if full {
                    return Seen::Replay(
                        ApiError::unavailable("too many requests with Idempotency-Key in flight")
                            .into_response(),
                    );
                }
                let (tx, rx) = watch::channel(());
                v.insert(Record {
                    request_hash,
                    slot: Slot::Running(rx),
                });
                Seen::Run(tx)
            }
        }
    }
}

pub async fn idempotency(
    State(store): State<Arc<Idempotency>>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get("idempotency-key").cloned() else {
        return next.run(request).await;
    };
    let Some(key) = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
    else {
        return ApiError::invalid("Idempotency-Key must be 1-255 visible characters")
            .into_response();
    };
    // Without a caller to keep it for, nothing is kept: the request is refused anyway.
    let Some(caller) = store.caller(request.headers().get("authorization")) else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, store.body_limit).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "request body too large",
        )
        .into_response();
    };
    let request_hash = hash_of((parts.method.as_str(), parts.uri.path(), &bytes[..]));
    let key = (caller, key.to_string());
    store.make_room();
    let done = loop {
        match store.claim(&key, request_hash) {
            Seen::Replay(response) => return response,
            // Done or abandoned: either way, look again.
            Seen::Wait(mut rx) => {
                let _ = rx.changed().await;
            }
            Seen::Run(done) => break done,
        }
    };
    let running = Running {
        store: &store,
        key,
        _done: done,
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if is_final(response.status())
        && let Some(outcome) = response.extensions().get::<Outcome>()
        && size_of(outcome) <= MAX_STORED_BYTES
    {
        let at = Instant::now();
        let record = Record {
            request_hash,
            slot: Slot::Done(Stored {
                status: response.status(),
                outcome: outcome.clone(),
                at,
            }),
        };
        store.store(running.key.clone(), record, at);
    }
    drop(running);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::envelope::Reply;
    use axum::Router;
    use axum::routing::post;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tower::ServiceExt;

    /// A route that answers each call with the next status of `answers`, after `delay`,
    /// behind the middleware; and how many times it ran.
    fn app(answers: Vec<u16>, delay: Duration) -> (Router, Arc<AtomicUsize>) {
        app_with(
            answers,
            delay,
            Idempotency::new(Duration::from_secs(3600), 1 << 16),
        )
    }

    fn app_with(
        answers: Vec<u16>,
        delay: Duration,
        store: Idempotency,
    ) -> (Router, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let answers = Arc::new(answers);
        let store = Arc::new(store);
        let router = Router::new()
            .route(
                "/act",
                post(move || {
                    let n = counted.fetch_add(1, SeqCst);
                    let status = StatusCode::from_u16(answers[n.min(answers.len() - 1)]).unwrap();
                    async move {
                        tokio::time::sleep(delay).await;
                        if status.is_success() {
                            Reply::ok("done", n).into_response()
                        } else {
                            ApiError::new(status, "NOT_NOW", "not now").into_response()
                        }
                    }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(store, idempotency));
        (router, calls)
    }

    async fn post_once(router: &Router, key: &str) -> (StatusCode, bool) {
        let request = Request::post("/act")
            .header("idempotency-key", key)
            .header("authorization", "Bearer t")
            .body(Body::from("{}"))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (response.status(), replayed)
    }

    #[tokio::test]
    async fn a_refusal_that_says_not_now_is_not_kept() {
        for not_now in [429, 503, 500, 504] {
            let (router, calls) = app(vec![not_now, 200], Duration::ZERO);
            assert_eq!(post_once(&router, "k").await.0.as_u16(), not_now);
            // The retry runs, and its answer is the one kept.
            assert_eq!(post_once(&router, "k").await, (StatusCode::OK, false));
            assert_eq!(post_once(&router, "k").await, (StatusCode::OK, true));
            assert_eq!(calls.load(SeqCst), 2, "{not_now}");
        }
        // A final refusal is kept like a success.
        let (router, calls) = app(vec![409, 200], Duration::ZERO);
        assert_eq!(post_once(&router, "k").await, (StatusCode::CONFLICT, false));
        assert_eq!(post_once(&router, "k").await, (StatusCode::CONFLICT, true));
        assert_eq!(calls.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn refusals_of_the_caller_are_not_kept_and_unverified_callers_not_at_all() {
        for refusal in [401, 403] {
            let (router, calls) = app(vec![refusal, 200], Duration::ZERO);
            assert_eq!(post_once(&router, "k").await.0.as_u16(), refusal);
            assert_eq!(post_once(&router, "k").await, (StatusCode::OK, false));
            assert_eq!(calls.load(SeqCst), 2);
        }
        // With keys: a token that does not verify is not remembered, nor answered from memory.
        let store = Idempotency::new(Duration::from_secs(3600), 1 << 16).verifying_with(
            crate::api::auth::Keys::new("0123456789abcdef0123456789abcdef"),
        );
        let (router, calls) = app_with(vec![200], Duration::ZERO, store);
        assert_eq!(post_once(&router, "k").await, (StatusCode::OK, false));
        assert_eq!(post_once(&router, "k").await, (StatusCode::OK, false));
        assert_eq!(calls.load(SeqCst), 2);
    }

    #[test]
    fn the_store_is_capped_and_expires_oldest_first() {
        let mut store = Idempotency::new(Duration::from_millis(50), 1 << 16);
        store.max_entries = 3;
        let done = |n: u8| Record {
            request_hash: u64::from(n),
            slot: Slot::Done(Stored {
                status: StatusCode::OK,
                outcome: Outcome::Reply {
                    message: "ok".into(),
                    data: serde_json::Value::Null,
                },
                at: Instant::now(),
            }),
        };
        let key = |n: u8| ("sub".to_string(), n.to_string());
        for n in 0..5u8 {
            assert!(store.make_room());
            let Slot::Done(Stored { at, .. }) = done(n).slot else {
                unreachable!()
            };
            let mut record = done(n);
            if let Slot::Done(s) = &mut record.slot {
                s.at = at;
            }
            store.store(key(n), record, at);
        }
        store.make_room();
        assert!(store.entries.len() < 3, "{}", store.entries.len());
        assert!(store.entries.contains_key(&key(4)) && !store.entries.contains_key(&key(0)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(store.make_room());
        assert_eq!(store.entries.len(), 0);
        assert!(store.order.lock().unwrap().is_empty());
        // A big answer is not kept.
        let big = Outcome::Reply {
            message: "ok".into(),
            data: serde_json::Value::String("x".repeat(MAX_STORED_BYTES)),
        };
        assert!(size_of(&big) > MAX_STORED_BYTES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_with_one_key_run_once() {
        let (router, calls) = app(vec![200], Duration::from_millis(200));
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let router = router.clone();
                tokio::spawn(async move { post_once(&router, "same").await })
            })
            .collect();
        let mut answers = Vec::new();
        for run in runs {
            answers.push(run.await.unwrap());
        }
        assert_eq!(calls.load(SeqCst), 1, "{answers:?}");
        assert!(
            answers.iter().all(|(s, _)| *s == StatusCode::OK),
            "{answers:?}"
        );
        assert_eq!(answers.iter().filter(|(_, replayed)| *replayed).count(), 3);
        // Another key is not held by this one.
        assert_eq!(post_once(&router, "other").await, (StatusCode::OK, false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_runs_itself_when_the_first_answer_was_not_final() {
        let (router, calls) = app(vec![503, 200], Duration::from_millis(150));
        let first = {
            let router = router.clone();
            tokio::spawn(async move { post_once(&router, "k").await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let second = post_once(&router, "k").await;
        assert_eq!(first.await.unwrap().0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second, (StatusCode::OK, false));
        assert_eq!(calls.load(SeqCst), 2);
    }
}
