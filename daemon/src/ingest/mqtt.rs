//! MQTT ingest: a persistent QoS 1 session whose messages are acknowledged
//! only after the store committed them.
//!
//! Three tasks, so that no wait can close a cycle:
//! - the poller drives rumqttc's event loop without pause (nothing happens
//!   otherwise: no pings, no acks on the wire), never awaits the client's
//!   request channel, and forwards publishes into a channel bounded by
//!   `inflight`; when that fills it stops reading the socket, which is the
//!   back-pressure the broker sees;
//! - the ingest task validates what is waiting, submits it as one group,
//!   awaits the commit (retrying while the store refuses, without acking),
//!   then queues one ack per message in arrival order, invalid ones
//!   included (they are counted and dead-lettered, never redelivered
//!   forever);
//! - the acker hands the acks to rumqttc in that order.
//!
//! An ack is only meaningful on the connection its message arrived on: on
//! a new connection the broker redelivers un-acked messages, possibly
//! under packet ids now used by others. Every connection therefore has a
//! generation; the acker checks it and enqueues under one lock, and the
//! poller bumps it and purges queued acks (`EventLoop::clean`) under the
//! same lock, so a stale ack can never reach a newer connection. The store
//! drops the redelivered duplicates.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edge_config::{Mqtt, Validation};
use rumqttc::{
    AsyncClient, ConnectionError, EventLoop, MqttOptions, Packet, Publish, QoS, StateError, SubAck,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, SubmitError};

use super::validate::parse_event;
use super::{count_outcomes, now_ms, EventSink, IngestStats};
use crate::backoff::Backoff;

/// Most messages grouped into one store submission.
const MAX_BATCH: usize = 1024;
/// Backoff bounds for resubmitting while the store refuses.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Room in rumqttc's request channel beyond `inflight`, for subscribes
/// and the disconnect.
const REQUEST_SLACK: usize = 64;
/// On shutdown: how long in-flight commits and their acks may take, then
/// how long the DISCONNECT may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why MQTT ingest could not start or had to stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("ingest.mqtt.client_id is empty: a persistent session needs a client id")]
    EmptyClientId,
    #[error("ingest.mqtt.topics is empty: nothing to subscribe to")]
    NoTopics,
    #[error("the store is closed; MQTT ingest stopped (un-acked messages stay with the broker)")]
    StoreClosed,
}

/// Runs MQTT ingest until `shutdown` resolves (then commits what is in
/// hand, sends its acks, and disconnects cleanly) or the store closes.
/// Broker outages are not errors: it reconnects with jittered backoff
/// between `reconnect_min` and `reconnect_max` for as long as it runs.
pub async fn run<S: EventSink>(
    cfg: Mqtt,
    validation: Validation,
    sink: S,
    stats: Arc<IngestStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MqttError> {
    if cfg.client_id.is_empty() {
        return Err(MqttError::EmptyClientId);
    }
    if cfg.topics.is_empty() {
        return Err(MqttError::NoTopics);
    }
    let inflight = usize::from(cfg.inflight.max(1));
    let (client, eventloop) = AsyncClient::new(options(&cfg), inflight + REQUEST_SLACK);

    let cancel = CancellationToken::new();
    let watcher = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => watcher.cancel(),
            () = watcher.cancelled() => {}
        }
    });

    let gate = Arc::new(AckGate::default());
    let (publish_tx, publish_rx) = mpsc::channel(inflight);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let ingest = Ingest {
        sink,
        validation,
        stats: Arc::clone(&stats),
        cancel: cancel.clone(),
    };
    let ingest = tokio::spawn(ingest.run(publish_rx, ack_tx));
    let mut acker = tokio::spawn(ack_loop(
        ack_rx,
        client.clone(),
        Arc::clone(&gate),
        Arc::clone(&stats),
    ));

    let mut poller = Poller {
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        eventloop,
        client,
        gate,
        stats: Arc::clone(&stats),
        topics: cfg.topics,
        broker: format!("{}:{}", cfg.host, cfg.port),
        generation: 0,
        subscribed: false,
        need_subscribe: false,
        connected_at: None,
    };
    poller.pump(&cancel, publish_tx).await;
    poller.drain(&mut acker).await;
    poller.disconnect().await;
    cancel.cancel();
    acker.abort();
    // Still inside a submission after the drain timeout: a hung store must
    // not hang shutdown. Its messages are un-acked and come back.
    if !ingest.is_finished() {
        ingest.abort();
    }
    stats.set_mqtt_connected(false);
    match ingest.await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Ok(()),
    }
}

fn options(cfg: &Mqtt) -> MqttOptions {
    let mut options = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    // rumqttc only takes whole-second keep-alives (or none).
    let keep_alive = if cfg.keep_alive.is_zero() {
        Duration::ZERO
    } else {
        cfg.keep_alive.max(Duration::from_secs(1))
    };
    options
        .set_keep_alive(keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(cfg.max_packet_size, cfg.max_packet_size)
        .set_inflight(cfg.inflight.max(1));
    options
}

/// A message in the pipeline, tagged with the connection it came on.
struct Received {
    generation: u64,
    publish: Publish,
}

/// What the acker needs to acknowledge one message.
struct AckJob {
    generation: u64,
    pkid: u16,
    qos: QoS,
}

/// Serialises "is this ack for the current connection? then enqueue it"
/// against "new connection: purge queued acks".
#[derive(Default)]
struct AckGate {
    generation: Mutex<u64>,
    /// Signalled after every poll: rumqttc's request channel may have room.
    room: Notify,
}

enum AckAttempt {
    Sent,
    Stale,
    Full,
}

impl AckGate {
    /// Called after a connection ended; returns the new generation.
    fn next_generation(&self, eventloop: &mut EventLoop) -> u64 {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *generation += 1;
        // rumqttc already purged acks when the connection failed, but one
        // may have been enqueued since; `clean` drops queued acks again.
        eventloop.clean();
        *generation
    }

    fn try_ack(&self, client: &AsyncClient, job: &AckJob) -> AckAttempt {
        let generation = self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *generation != job.generation {
            return AckAttempt::Stale;
        }
        // An ack needs only the packet id and QoS of its publish.
        let mut publish = Publish::new("", job.qos, Vec::new());
        publish.pkid = job.pkid;
        match client.try_ack(&publish) {
            Ok(()) => AckAttempt::Sent,
            // Full, or the event loop is gone (then we get aborted).
            Err(_) => AckAttempt::Full,
        }
    }
}

async fn ack_loop(
    mut jobs: mpsc::UnboundedReceiver<AckJob>,
    client: AsyncClient,
    gate: Arc<AckGate>,
    stats: Arc<IngestStats>,
) {
    while let Some(job) = jobs.recv().await {
        loop {
            let room = gate.room.notified();
            tokio::pin!(room);
            // Registered before trying, so a poll in between is not missed.
            room.as_mut().enable();
            match gate.try_ack(&client, &job) {
                AckAttempt::Sent => break,
                AckAttempt::Stale => {
                    stats.add_mqtt_stale_ack();
                    break;
                }
                AckAttempt::Full => room.await,
            }
        }
    }
}

struct Poller {
    eventloop: EventLoop,
    client: AsyncClient,
    gate: Arc<AckGate>,
    stats: Arc<IngestStats>,
    backoff: Backoff,
    topics: Vec<String>,
    broker: String,
    generation: u64,
    /// Whether this process subscribed at least once.
    subscribed: bool,
    need_subscribe: bool,
    /// When the current connection was accepted.
    connected_at: Option<std::time::Instant>,
}

/// How long a connection must have lasted for its loss to start the
/// reconnect backoff over. Reset at every accepted connection instead, a
/// connection that fails at once every time (a message the client cannot
/// read, sent again first on each one) would be retried at the shortest
/// delay for good.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

impl Poller {
    /// Polls and forwards until `cancel`.
    async fn pump(&mut self, cancel: &CancellationToken, publishes: mpsc::Sender<Received>) {
        loop {
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                event = self.eventloop.poll() => event,
            };
            self.gate.room.notify_waiters();
            match event {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                    self.on_connack(ack.session_present)
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                    let received = Received {
                        generation: self.generation,
                        publish,
                    };
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return,
                        sent = publishes.send(received) => if sent.is_err() { return },
                    }
                }
                Ok(rumqttc::Event::Incoming(Packet::SubAck(ack))) => self.on_suback(&ack),
                Ok(_) => {}
                Err(error) => {
                    self.on_error(&error);
                    let delay = self.backoff.next_delay();
                    tracing::debug!(?delay, "next MQTT connection attempt");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
            if self.need_subscribe {
                self.subscribe();
            }
        }
    }

    fn on_connack(&mut self, session_present: bool) {
        self.connected_at = Some(std::time::Instant::now());
        self.stats.set_mqtt_connected(true);
        tracing::info!(broker = %self.broker, session_present, "connected to the MQTT broker");
        if !session_present && self.subscribed {
            tracing::warn!(
                broker = %self.broker,
                "the broker lost our session: messages published while we were away were not kept for us"
            );
        }
        // Subscribing once per process also picks up topic changes on a
        // session the broker kept from an earlier run.
        if !session_present || !self.subscribed {
            self.need_subscribe = true;
        }
    }

    fn subscribe(&mut self) {
        let filters = self
            .topics
            .iter()
            .map(|topic| SubscribeFilter::new(topic.clone(), QoS::AtLeastOnce));
        // Never await the request channel here: only this task drains it.
        // If it is full, the next poll makes room and we try again.
        if self.client.try_subscribe_many(filters).is_ok() {
            self.need_subscribe = false;
            self.subscribed = true;
        }
    }

    fn on_suback(&self, ack: &SubAck) {
        for (i, code) in ack.return_codes.iter().enumerate() {
            match code {
                SubscribeReasonCode::Success(qos) => tracing::debug!(
                    topic = self.topics.get(i).map(String::as_str),
                    ?qos,
                    "subscribed"
                ),
                SubscribeReasonCode::Failure => tracing::error!(
                    topic = self.topics.get(i).map(String::as_str),
                    broker = %self.broker,
                    "the broker refused the subscription; no events arrive from this topic filter"
                ),
            }
        }
    }

    fn on_error(&mut self, error: &ConnectionError) {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
        {
            self.backoff.reset();
        }
        let was_connected = self.stats.mqtt_connected();
        self.stats.set_mqtt_connected(false);
        self.stats.add_mqtt_connection_error();
        self.generation = self.gate.next_generation(&mut self.eventloop);
        if let ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(size),
        )) = error
        {
            tracing::error!(
                broker = %self.broker,
                size,
                "the broker sent a message larger than ingest.mqtt.max_packet_size; it will be \
                 redelivered on every reconnect: raise max_packet_size or cap message sizes on \
                 the broker (message_size_limit)"
            );
        } else if was_connected {
            tracing::warn!(broker = %self.broker, %error, "lost the MQTT connection; reconnecting");
        } else {
            tracing::warn!(broker = %self.broker, %error, "MQTT connection attempt failed");
        }
    }

    /// After `cancel`: keeps polling so the acks of what the ingest task
    /// still commits reach the broker, until the acker is done or the
    /// drain timeout passes. New publishes are left un-acked: the broker
    /// redelivers them to the next run.
    async fn drain(&mut self, acker: &mut tokio::task::JoinHandle<()>) {
        if !self.stats.mqtt_connected() {
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let event = tokio::select! {
                biased;
                _ = &mut *acker => return,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("MQTT shutdown: acks still pending after {DRAIN_TIMEOUT:?}; the broker will redeliver those messages");
                    return;
                }
                event = self.eventloop.poll() => event,
            };
            self.gate.room.notify_waiters();
            if event.is_err() {
                return;
            }
        }
    }

    /// Sends DISCONNECT so the broker keeps the session without treating
    /// us as lost, then waits for the broker to close the connection: it
    /// does so only after it processed everything before the DISCONNECT,
    /// acks included. Dropping the socket earlier could let a quick
    /// successor (a restart under the same client id) take the session
    /// over before the broker read our last acks, which it then discards.
    async fn disconnect(&mut self) {
        if !self.stats.mqtt_connected() || self.client.try_disconnect().is_err() {
            return;
        }
        let deadline = Instant::now() + DISCONNECT_TIMEOUT;
        let mut sent = false;
        loop {
            let event = tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(broker = %self.broker, "the broker did not close the connection after DISCONNECT within {DISCONNECT_TIMEOUT:?}");
                    return;
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => sent = true,
                // Publishes arriving now stay un-acked: redelivered later.
                Ok(_) => {}
                Err(_) => {
                    if sent {
                        tracing::info!(broker = %self.broker, "disconnected from the MQTT broker");
                    }
                    return;
                }
            }
        }
    }
}

/// The ingest task: validate, commit, then queue acks in arrival order.
struct Ingest<S> {
    sink: S,
    validation: Validation,
    stats: Arc<IngestStats>,
    cancel: CancellationToken,
}

enum Commit {
    Done,
    Cancelled,
    Closed,
}

impl<S: EventSink> Ingest<S> {
    async fn run(
        self,
        mut publishes: mpsc::Receiver<Received>,
        acks: mpsc::UnboundedSender<AckJob>,
    ) -> Result<(), MqttError> {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Ok(()),
                received = publishes.recv() => match received {
                    Some(received) => received,
                    None => return Ok(()),
                },
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match publishes.try_recv() {
                    Ok(received) => batch.push(received),
                    Err(_) => break,
                }
            }
            match self.commit(&batch).await {
                Commit::Done => {}
                Commit::Cancelled => return Ok(()),
                Commit::Closed => {
                    tracing::error!("the store closed; stopping MQTT ingest");
                    self.cancel.cancel();
                    return Err(MqttError::StoreClosed);
                }
            }
            for received in batch.drain(..) {
                let publish = received.publish;
                if publish.qos != QoS::AtMostOnce {
                    let job = AckJob {
                        generation: received.generation,
                        pkid: publish.pkid,
                        qos: publish.qos,
                    };
                    // Only fails when the acker is gone, i.e. on shutdown.
                    let _ = acks.send(job);
                }
            }
        }
    }

    /// Validates and commits one group; returns once every valid event is
    /// committed (or ingest must stop). Rejected messages are accounted
    /// for here and count as done.
    async fn commit(&self, batch: &[Received]) -> Commit {
        let now = now_ms();
        self.stats.add_received(batch.len() as u64);
        let mut valid = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut samples = Vec::new();
        for (i, received) in batch.iter().enumerate() {
            let payload = &received.publish.payload;
            match parse_event(payload, now, &self.validation) {
                Ok(event) => {
                    valid.push(i);
                    events.push(event);
                }
                Err(rejection) => {
                    let topic = &received.publish.topic;
                    let origin = || format!("mqtt:{topic}");
                    if let Some(sample) = self
                        .stats
                        .record_rejection(&origin, payload, &rejection, now)
                    {
                        samples.push(sample);
                    }
                }
            }
        }
        if !samples.is_empty() {
            self.sink.dead_letter(samples).await;
        }
        if events.is_empty() {
            return Commit::Done;
        }

        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut refusals = 0u64;
        loop {
            let submitted = events.len();
            match self.sink.submit(events).await {
                Ok(outcomes) => {
                    if outcomes.len() != submitted {
                        tracing::error!(
                            expected = submitted,
                            got = outcomes.len(),
                            "store returned a wrong number of outcomes"
                        );
                    }
                    let (accepted, duplicates) = count_outcomes(&outcomes);
                    self.stats.add_outcomes(accepted, duplicates);
                    if refusals > 0 {
                        tracing::info!(
                            refusals,
                            events = submitted,
                            "the store took the held MQTT messages; acking them"
                        );
                    }
                    return Commit::Done;
                }
                Err(SubmitError::Closed) => return Commit::Closed,
                Err(
                    error @ (SubmitError::OutboxFull | SubmitError::StoreFull | SubmitError::Busy),
                ) => {
                    refusals += 1;
                    self.stats.record_backpressure("mqtt", &error, now_ms());
                }
                Err(error @ SubmitError::Storage(_)) => {
                    self.stats.add_submit_error();
                    tracing::error!(%error, "store failed an MQTT ingest submission; retrying");
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return Commit::Cancelled,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
            // `submit` consumed the events. Parsing again with the same
            // arrival time yields the same events, and keeps clones off
            // the common path where the first submission commits.
            events = self.reparse(batch, &valid, now);
        }
    }

    fn reparse(&self, batch: &[Received], valid: &[usize], now: i64) -> Vec<Event> {
        valid
            .iter()
            .filter_map(|&i| parse_event(&batch[i].publish.payload, now, &self.validation).ok())
            .collect()
    }
}
