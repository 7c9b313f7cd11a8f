//! HTTP ingest over real loopback HTTP: good input is committed before the
//! 202, bad input gets a clear per-event rejection without taking valid
//! neighbours down, oversize bodies get 413, a refusing store gets 503 with
//! `Retry-After`, and the server keeps serving through all of it.
//!
//! The store is an in-memory `EventSink` that dedups by (source, id) like
//! the real one, so duplicate accounting is checked end to end.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use touchline::event::{DeadLetter, Event, EventOutcome, SubmitError};
use touchline::ingest::{self, EventSink, HttpIngestConfig, IngestStats, RejectReason};

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

/// The store stand-in: commits in memory, dedups by (source, id),
/// refuses with `OutboxFull` while `refuse` is set, and answers a bounded
/// wait with `Busy` while `busy` is set.
#[derive(Clone, Default)]
struct MemorySink {
    inner: Arc<SinkInner>,
}

#[derive(Default)]
struct SinkInner {
    state: Mutex<SinkState>,
    refuse: AtomicBool,
    busy: AtomicBool,
}

#[derive(Default)]
struct SinkState {
    seen: HashSet<(String, String)>,
    committed: Vec<Event>,
    dead: Vec<DeadLetter>,
}

impl MemorySink {
    fn committed_ids(&self) -> Vec<String> {
        let state = self.inner.state.lock().unwrap();
        state.committed.iter().map(|e| e.id.clone()).collect()
    }

    fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.state.lock().unwrap().dead.clone()
    }
}

impl EventSink for MemorySink {
    async fn submit(&self, events: Vec<Event>) -> Result<Vec<EventOutcome>, SubmitError> {
        if self.inner.refuse.load(Ordering::SeqCst) {
            return Err(SubmitError::OutboxFull);
        }
        let mut state = self.inner.state.lock().unwrap();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            if state.seen.insert((event.source.clone(), event.id.clone())) {
                state.committed.push(event);
                outcomes.push(EventOutcome::Committed { records: 0 });
            } else {
                outcomes.push(EventOutcome::Duplicate);
            }
        }
        Ok(outcomes)
    }

    async fn submit_within(
        &self,
        events: Vec<Event>,
        _wait: Duration,
    ) -> Result<Vec<EventOutcome>, SubmitError> {
        if self.inner.busy.load(Ordering::SeqCst) {
            return Err(SubmitError::Busy);
        }
        self.submit(events).await
    }

    async fn dead_letter(&self, samples: Vec<DeadLetter>) {
        let mut state = self.inner.state.lock().unwrap();
        state.dead.extend(samples);
        let excess = state.dead.len().saturating_sub(1000);
        state.dead.drain(..excess);
    }
}

struct Server {
    addr: SocketAddr,
    sink: MemorySink,
    stats: Arc<IngestStats>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

fn validation(max_event_size: usize) -> edge_config::Validation {
    edge_config::Validation {
        max_event_size,
        max_future_skew: Duration::from_secs(300),
        max_age: Duration::from_secs(7 * 24 * 3600),
        dedup_retention: Duration::from_secs(24 * 3600),
        venue_types: vec!["venue.*".into(), "match.*".into()],
        dlq_max: 1000,
    }
}

impl Server {
    async fn start(max_event_size: usize, max_body: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = MemorySink::default();
        let stats = Arc::new(IngestStats::new());
        let cfg = HttpIngestConfig {
            validation: validation(max_event_size),
            max_body,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ingest::serve(
            listener,
            sink.clone(),
            cfg,
            Arc::clone(&stats),
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            sink,
            stats,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    async fn post(&self, content_type: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(format!("http://{}/v1/events", self.addr))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, content_type: &str, body: &Value) -> (u16, Value) {
        let response = self.post(content_type, body.to_string()).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The server still takes a fresh valid event and answers health
    /// checks: nothing before broke it.
    async fn assert_still_serving(&self) {
        let id = format!("alive-{}", self.sink.committed_ids().len());
        let (status, body) = self.post_json(SINGLE, &event(&id, Some("c-alive"))).await;
        assert_eq!(status, 202, "{body}");
        assert!(self.sink.committed_ids().contains(&id));
        let health = self
            .http
            .get(format!("http://{}/healthz", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
        assert_eq!(health.text().await.unwrap(), "ok");
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop within 10 s");
        result.unwrap().unwrap();
    }
}

fn event(id: &str, subject: Option<&str>) -> Value {
    let mut e = json!({
        "specversion": "1.0",
        "id": id,
        "source": "test/app",
        "type": "fan.cheer",
        "data": {"intensity": 3},
    });
    if let Some(subject) = subject {
        e["subject"] = json!(subject);
    }
    e
}

fn venue_event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "test/feed", "type": "match.goal"})
}

fn rejected(stats: &IngestStats, reason: RejectReason) -> u64 {
    stats.snapshot().rejected_for(reason)
}

#[tokio::test]
async fn single_event_is_committed_then_202() {
    let server = Server::start(64 * 1024, 1024 * 1024).await;
    let (status, body) = server.post_json(SINGLE, &event("e1", Some("c1"))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"status": "accepted"}));
    assert_eq!(server.sink.committed_ids(), ["e1"]);

    // Plain JSON is taken as one event; a resend is a duplicate, still 202.
    let (status, body) = server
        .post_json("Application/JSON; charset=utf-8", &event("e1", Some("c1")))
        .await;
    assert_eq!(status, 202);
    assert_eq!(body, json!({"status": "duplicate"}));

    // Venue-wide types need no subject; a missing time becomes arrival time.
    let (status, _) = server.post_json(SINGLE, &venue_event("goal-1")).await;
    assert_eq!(status, 202);
    {
        let state = server.sink.inner.state.lock().unwrap();
        let goal = state.committed.iter().find(|e| e.id == "goal-1").unwrap();
        assert_eq!(goal.subject, None);
        assert!(goal.time_ms > 1_700_000_000_000);
    }

    let s = server.stats.snapshot();
    assert_eq!((s.received, s.accepted, s.duplicates), (3, 2, 1));
    assert_eq!(s.rejected_total(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn single_bad_inputs_get_clear_rejections() {
    let server = Server::start(4 * 1024, 1024 * 1024).await;
    let mut far_future = event("future", Some("c1"));
    far_future["time"] = json!("2999-01-01T00:00:00Z");
    let mut too_old = event("old", Some("c1"));
    too_old["time"] = json!("2001-01-01T00:00:00Z");
    let mut bad_time = event("bad-time", Some("c1"));
    bad_time["time"] = json!("tomorrow");
    let mut wrong_id = event("x", Some("c1"));
    wrong_id["id"] = json!(5);
    let mut wrong_subject = event("ws", Some("c1"));
    wrong_subject["subject"] = json!({"customer": 1});
    let mut no_id = event("x", Some("c1"));
    no_id.as_object_mut().unwrap().remove("id");
    let mut bad_version = event("v", Some("c1"));
    bad_version["specversion"] = json!("0.3");
    let mut binary = event("bin", Some("c1"));
    binary["data_base64"] = json!("AAEC");
    let mut oversized = event("big", Some("c1"));
    oversized["data"] = json!({"blob": "x".repeat(5000)});
    let truncated = event("t", Some("c1")).to_string();
    let truncated = &truncated[..truncated.len() / 2];
    let mut invalid_utf8 =
        br#"{"specversion":"1.0","id":"u","source":"s","type":"fan.cheer","subject":"c"#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe\"}");

    let cases: Vec<(&str, Vec<u8>, RejectReason)> = vec![
        (
            "truncated JSON",
            truncated.as_bytes().to_vec(),
            RejectReason::InvalidJson,
        ),
        ("not JSON", b"hello".to_vec(), RejectReason::InvalidJson),
        (
            "not an object",
            b"[1, 2]".to_vec(),
            RejectReason::NotAnObject,
        ),
        ("invalid UTF-8", invalid_utf8, RejectReason::InvalidUtf8),
        (
            "wrong id type",
            wrong_id.to_string().into(),
            RejectReason::WrongType,
        ),
        (
            "wrong subject type",
            wrong_subject.to_string().into(),
            RejectReason::WrongType,
        ),
        (
            "missing id",
            no_id.to_string().into(),
            RejectReason::MissingAttribute,
        ),
        (
            "missing subject",
            event("ns", None).to_string().into(),
            RejectReason::MissingSubject,
        ),
        (
            "bad specversion",
            bad_version.to_string().into(),
            RejectReason::BadSpecversion,
        ),
        (
            "far-future time",
            far_future.to_string().into(),
            RejectReason::TimeInFuture,
        ),
        ("too old", too_old.to_string().into(), RejectReason::TooOld),
        (
            "bad time",
            bad_time.to_string().into(),
            RejectReason::BadTime,
        ),
        (
            "binary data",
            binary.to_string().into(),
            RejectReason::UnsupportedEncoding,
        ),
        (
            "oversized event",
            oversized.to_string().into(),
            RejectReason::TooLarge,
        ),
    ];
    for (name, body, reason) in &cases {
        let response = server.post(SINGLE, body.clone()).await;
        assert_eq!(response.status().as_u16(), 400, "{name}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["status"], "rejected", "{name}: {answer}");
        assert_eq!(answer["reason"], reason.label(), "{name}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}: {answer}"
        );
        assert!(rejected(&server.stats, *reason) >= 1, "{name}");
    }
    assert!(server.sink.committed_ids().is_empty());
    let s = server.stats.snapshot();
    assert_eq!(s.rejected_total(), cases.len() as u64);
    assert_eq!(s.received, cases.len() as u64);

    // Every reason was sampled into the dead-letter store with its label.
    let dead = server.sink.dead_letters();
    assert_eq!(dead.len(), cases.len());
    for (_, _, reason) in &cases {
        assert!(dead.iter().any(|d| d.reason == reason.label()));
    }
    assert!(dead.iter().all(|d| d.origin.starts_with("http:127.0.0.1:")));

    server.assert_still_serving().await;
    server.shutdown().await;
}

#[tokio::test]
async fn batch_commits_valid_neighbours_and_lists_errors() {
    let server = Server::start(4 * 1024, 1024 * 1024).await;
    let mut far_future = event("b-future", Some("c1"));
    far_future["time"] = json!("2999-01-01T00:00:00Z");
    let mut wrong_type = event("b-wrong", Some("c1"));
    wrong_type["source"] = json!(true);
    let mut no_id = event("x", Some("c1"));
    no_id.as_object_mut().unwrap().remove("id");
    let mut oversized = event("b-big", Some("c1"));
    oversized["data"] = json!({"blob": "x".repeat(5000)});

    // Raw bytes: a batch may carry elements no JSON library would build.
    let elements: Vec<Vec<u8>> = vec![
        event("b-0", Some("c1")).to_string().into(),
        br#"{"specversion":"1.0","id": }"#.to_vec(),
        event("b-2", Some("c2")).to_string().into(),
        wrong_type.to_string().into(),
        event("b-4", None).to_string().into(),
        no_id.to_string().into(),
        b"{\"specversion\":\"1.0\",\"id\":\"b-6\",\"source\":\"s\",\"type\":\"fan.cheer\",\"subject\":\"\xc3\x28\"}".to_vec(),
        far_future.to_string().into(),
        oversized.to_string().into(),
        b"42".to_vec(),
        venue_event("b-10").to_string().into(),
        event("b-0", Some("c1")).to_string().into(),
    ];
    let mut body = b"[\n".to_vec();
    body.extend(elements.join(&b",\n"[..]));
    body.extend_from_slice(b"\n]");

    let response = server.post(BATCH, body).await;
    assert_eq!(response.status().as_u16(), 202);
    let answer: Value = response.json().await.unwrap();
    let expected = [
        ("accepted", None),
        ("rejected", Some(RejectReason::InvalidJson)),
        ("accepted", None),
        ("rejected", Some(RejectReason::WrongType)),
        ("rejected", Some(RejectReason::MissingSubject)),
        ("rejected", Some(RejectReason::MissingAttribute)),
        ("rejected", Some(RejectReason::InvalidUtf8)),
        ("rejected", Some(RejectReason::TimeInFuture)),
        ("rejected", Some(RejectReason::TooLarge)),
        ("rejected", Some(RejectReason::NotAnObject)),
        ("accepted", None),
        ("duplicate", None),
    ];
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), expected.len(), "{answer}");
    for (i, (status, reason)) in expected.iter().enumerate() {
        let r = &results[i];
        assert_eq!(r["index"], i, "{answer}");
        assert_eq!(r["status"], *status, "element {i}: {r}");
        match reason {
            Some(reason) => {
                assert_eq!(r["reason"], reason.label(), "element {i}: {r}");
                assert!(r["detail"].as_str().is_some_and(|d| !d.is_empty()));
            }
            None => assert!(r.get("reason").is_none(), "element {i}: {r}"),
        }
    }
    assert_eq!(answer["accepted"], 3);
    assert_eq!(answer["duplicates"], 1);
    assert_eq!(answer["rejected"], 8);
    assert_eq!(server.sink.committed_ids(), ["b-0", "b-2", "b-10"]);
    let s = server.stats.snapshot();
    assert_eq!((s.received, s.accepted, s.duplicates), (12, 3, 1));
    assert_eq!(s.rejected_total(), 8);
    assert_eq!(server.sink.dead_letters().len(), 8);

    server.assert_still_serving().await;
    server.shutdown().await;
}

#[tokio::test]
async fn unusable_batches_are_400() {
    let server = Server::start(64 * 1024, 1024 * 1024).await;

    // Only invalid events: nothing to commit, 400 with the per-event list.
    let batch = json!([event("x", None), {"specversion": "1.0"}]);
    let (status, answer) = server.post_json(BATCH, &batch).await;
    assert_eq!(status, 400);
    assert_eq!(answer["rejected"], 2);
    assert_eq!(answer["results"][0]["reason"], "missing_subject");
    assert_eq!(answer["results"][1]["reason"], "missing_attribute");

    for (body, error) in [
        (&br#"[{"specversion":"1.0"}, {"#[..], "malformed_batch"),
        (br#"{"specversion":"1.0"}"#, "malformed_batch"),
        (b"", "malformed_batch"),
        (b"[1,]", "malformed_batch"),
        (b" [ ] ", "empty_batch"),
    ] {
        let response = server.post(BATCH, body.to_vec()).await;
        assert_eq!(response.status().as_u16(), 400);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], error, "{answer}");
        assert!(answer["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert!(server.sink.committed_ids().is_empty());

    // More elements than a batch may hold: 413 before any is parsed.
    let max = touchline::ingest::validate::MAX_BATCH_EVENTS;
    let body = format!("[{}]", vec!["1"; max + 1].join(","));
    let response = server.post(BATCH, body).await;
    assert_eq!(response.status().as_u16(), 413);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "too_many_events", "{answer}");

    // Unknown content types are refused before reading.
    let response = server.post("text/plain", "hello").await;
    assert_eq!(response.status().as_u16(), 415);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "unsupported_media_type");

    server.assert_still_serving().await;
    server.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_duplicates_commit_once() {
    let server = Server::start(64 * 1024, 8 * 1024 * 1024).await;
    let one = event("dup-1", Some("c1"));
    let batch = Value::Array(vec![one.clone(); 10_000]);
    let (status, answer) = server.post_json(BATCH, &batch).await;
    assert_eq!(status, 202);
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["duplicates"], 9_999);
    assert_eq!(answer["results"][0]["status"], "accepted");
    assert_eq!(answer["results"][9_999]["status"], "duplicate");

    // And once more as single requests.
    for _ in 0..20 {
        let (status, answer) = server.post_json(SINGLE, &one).await;
        assert_eq!(status, 202);
        assert_eq!(answer["status"], "duplicate");
    }
    assert_eq!(server.sink.committed_ids(), ["dup-1"]);
    let s = server.stats.snapshot();
    assert_eq!((s.accepted, s.duplicates), (1, 10_019));
    assert_eq!(s.rejected_total(), 0);

    server.assert_still_serving().await;
    server.shutdown().await;
}

/// A 503 that tells the client to retry after a second, saying `error`.
async fn assert_retry_in_a_second(response: reqwest::Response, error: &str) {
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], error);
}

#[tokio::test]
async fn full_outbox_answers_503_with_retry_after() {
    let server = Server::start(64 * 1024, 1024 * 1024).await;
    server.sink.inner.refuse.store(true, Ordering::SeqCst);

    let response = server
        .post(SINGLE, event("bp-1", Some("c1")).to_string())
        .await;
    assert_retry_in_a_second(response, "outbox_full").await;

    let batch = json!([event("bp-2", Some("c1")), event("bp-3", Some("c2"))]);
    let response = server.post(BATCH, batch.to_string()).await;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(server.sink.committed_ids().is_empty());
    assert_eq!(server.stats.snapshot().backpressure, 2);

    // Once the outbox drains, the client's retry goes through.
    server.sink.inner.refuse.store(false, Ordering::SeqCst);
    let (status, answer) = server.post_json(BATCH, &batch).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(server.sink.committed_ids(), ["bp-2", "bp-3"]);

    // A queue that stays full past the request's wait: 503 too, so the
    // request does not hold its body while it waits.
    server.sink.inner.busy.store(true, Ordering::SeqCst);
    let response = server
        .post(SINGLE, event("bp-4", Some("c1")).to_string())
        .await;
    assert_retry_in_a_second(response, "store_busy").await;
    server.sink.inner.busy.store(false, Ordering::SeqCst);

    // A refused batch's bad events are counted once: when the batch that
    // comes again is answered with them.
    let rejected_before = server.stats.snapshot().rejected_total();
    let mixed = json!([event("bp-5", Some("c1")), event("bp-bad", None)]);
    server.sink.inner.refuse.store(true, Ordering::SeqCst);
    let response = server.post(BATCH, mixed.to_string()).await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(server.stats.snapshot().rejected_total(), rejected_before);
    server.sink.inner.refuse.store(false, Ordering::SeqCst);
    let (status, answer) = server.post_json(BATCH, &mixed).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["rejected"], 1);
    assert_eq!(answer["results"][1]["reason"], "missing_subject");
    assert_eq!(
        server.stats.snapshot().rejected_total(),
        rejected_before + 1
    );

    server.assert_still_serving().await;
    server.shutdown().await;
}

/// Sends raw bytes and reads the whole answer (the request asks the
/// server to close). Writing runs in its own task: the server may stop
/// reading once it has decided.
async fn raw_exchange(addr: SocketAddr, request: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        writer
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer))
        .await
        .expect("no complete answer within 10 s")
        .unwrap();
    drop(write.await);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn oversized_body_is_413_without_buffering_it() {
    let max_body = 64 * 1024;
    let server = Server::start(4 * 1024, max_body).await;

    // Declared too large: refused from the headers, before any body byte.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: {BATCH}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        1u64 << 40
    );
    let answer = raw_exchange(server.addr, head.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // Chunked, no length: cut off while reading once past the limit.
    let mut request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: {BATCH}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![b' '; 16 * 1024];
    for _ in 0..(max_body / chunk.len() + 2) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(&chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let answer = raw_exchange(server.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Through a regular client, a body just over the limit.
    let response = server.post(BATCH, vec![b' '; max_body + 1]).await;
    assert_eq!(response.status().as_u16(), 413);
    // Each refusal is counted and sampled like any rejected input.
    assert_eq!(rejected(&server.stats, RejectReason::TooLarge), 3);
    assert!(server
        .sink
        .dead_letters()
        .iter()
        .all(|d| d.reason == "too_large" && d.detail.contains("limit")));

    // A body just under the limit is read and judged on its content.
    let mut batch = b"[".to_vec();
    batch.extend(event("fits", Some("c1")).to_string().as_bytes());
    batch.push(b']');
    batch.resize(max_body, b' ');
    let response = server.post(BATCH, batch).await;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(server.sink.committed_ids(), ["fits"]);

    server.assert_still_serving().await;
    server.shutdown().await;
}
