//! Actions out: publishes the store's queued MQTT messages (progress
//! feedback, later offers) to the venue broker, at least once.
//!
//! Messages are durable in the store from the commit that produced them
//! until the broker's PUBACK; this stage only moves them. Three tasks keep
//! rumqttc's event loop polled without pause: the feeder reads the queue
//! after each commit and hands messages over through a bounded channel;
//! the poller drives the connection, publishes with `try_publish` (never
//! waiting on rumqttc's request channel) and pairs PUBACKs with messages
//! in order (MQTT 3.1.1 §4.6); the acker deletes acknowledged messages in
//! the store. Each connection gets a fresh client with a clean session, so
//! nothing un-acked hides in rumqttc: on reconnect the poller publishes
//! again what it still holds, and after a restart the feeder reads again
//! what the store still holds. A message may therefore arrive twice; each
//! payload carries an `id` for the app to drop the copy.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_config::Mqtt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::store::publications::Publication;
use crate::store::StoreHandle;

/// Messages read from the store at once.
const READ_BATCH: usize = 256;
/// How often the feeder looks even without a commit notification.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long acknowledged messages wait to be deleted together.
const ACK_LINGER: Duration = Duration::from_millis(50);
/// Room in rumqttc's request channel beyond the in-flight window.
const REQUEST_SLACK: usize = 16;

/// Live state of the publisher, for metrics and status.
#[derive(Debug, Default)]
pub struct PublisherState {
    connected: AtomicBool,
    published: AtomicU64,
    acked: AtomicU64,
    reconnects: AtomicU64,
}

impl PublisherState {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// PUBLISH packets handed to rumqttc (republications included).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
    /// PUBACKs received.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// Connection settings, from `[ingest.mqtt]`: same broker, client id
/// `<client_id>-out`.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub max_packet_size: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Messages awaiting PUBACK at once.
    pub window: usize,
}

impl PublisherSettings {
    pub fn from_config(mqtt: &Mqtt) -> PublisherSettings {
        PublisherSettings {
            host: mqtt.host.clone(),
            port: mqtt.port,
            client_id: format!("{}-out", mqtt.client_id),
            keep_alive: mqtt.keep_alive.max(Duration::from_secs(1)),
            max_packet_size: mqtt.max_packet_size,
            reconnect_min: mqtt.reconnect_min,
            reconnect_max: mqtt.reconnect_max,
            window: usize::from(mqtt.inflight.clamp(1, 1000)),
        }
    }
}

/// Runs until `shutdown`; then disconnects (what is not acknowledged
/// stays in the store for the next start).
pub async fn run(
    settings: PublisherSettings,
    store: StoreHandle,
    state: Arc<PublisherState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            shutdown.await;
            cancel.cancel();
        });
    }
    let (feed_tx, feed_rx) = mpsc::channel(settings.window);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let feeder = tokio::spawn(feed(store.clone(), feed_tx, cancel.clone()));
    let acker = tokio::spawn(acknowledge(store, ack_rx));
    let mut poller = Poller {
        settings,
        state,
        feed: feed_rx,
        acks: ack_tx,
        in_flight: VecDeque::new(),
    };
    poller.run(&cancel).await;
    feeder.abort();
    drop(poller);
    // The acker ends once the poller's sender is gone and it has written
    // the last acks.
    let _ = acker.await;
}

/// Reads the queue in order and hands messages to the poller.
async fn feed(store: StoreHandle, tx: mpsc::Sender<(u64, Publication)>, cancel: CancellationToken) {
    let changed = store.publications_changed();
    let mut after = 0;
    loop {
        let notified = changed.notified();
        match store.read_publications(after, READ_BATCH).await {
            Ok(batch) if !batch.is_empty() => {
                for (seq, p) in batch {
                    after = seq;
                    if tx.send((seq, p)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "cannot read publications; the store is closing");
                return;
            }
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Deletes acknowledged messages, gathering the acks of up to
/// [`ACK_LINGER`] into one deletion.
///
/// A deletion need not be durable at once: a message whose ack a crash
/// loses is published again, and apps drop the copy by its id. Each
/// deletion is a store transaction with its fsyncs, though, and the
/// offers and awards queued behind it wait for them: deleting per PUBACK
/// doubled the commits of a steady stream of triggers.
async fn acknowledge(store: StoreHandle, mut rx: mpsc::UnboundedReceiver<u64>) {
    while let Some(mut through) = rx.recv().await {
        let linger = tokio::time::sleep(ACK_LINGER);
        tokio::pin!(linger);
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(n) => through = through.max(n),
                    // Stopping: write what we have now.
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        if let Err(e) = store.ack_publications(through).await {
            // The message stays queued and is published again after a
            // restart: at least once, never lost.
            warn!(error = %e, through, "cannot delete acknowledged publications");
        }
    }
}

struct Poller {
    settings: PublisherSettings,
    state: Arc<PublisherState>,
    feed: mpsc::Receiver<(u64, Publication)>,
    acks: mpsc::UnboundedSender<u64>,
    /// Published on the current connection (or to be republished on the
    /// next), awaiting PUBACK, oldest first.
    in_flight: VecDeque<(u64, Publication)>,
}

impl Poller {
    async fn run(&mut self, cancel: &CancellationToken) {
        let s = &self.settings;
        let mut backoff = Backoff::new(s.reconnect_min, s.reconnect_max);
        let mut first = true;
        while !cancel.is_cancelled() {
            if !first {
                self.state.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            if self.connection(cancel, &mut backoff).await {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// One connection, until it fails (false) or shutdown (true).
    async fn connection(&mut self, cancel: &CancellationToken, backoff: &mut Backoff) -> bool {
        let s = &self.settings;
        let mut options = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
        options
            .set_keep_alive(s.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(s.max_packet_size, s.max_packet_size)
            .set_inflight(u16::try_from(s.window).unwrap_or(u16::MAX));
        let (client, mut eventloop) = AsyncClient::new(options, s.window * 2 + REQUEST_SLACK);
        let mut connected = false;
        loop {
            let room = connected && self.in_flight.len() < self.settings.window;
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = client.try_disconnect();
                    // Let the DISCONNECT go out; bounded.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while eventloop.poll().await.is_ok() {}
                    })
                    .await;
                    self.state.connected.store(false, Ordering::Relaxed);
                    return true;
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff.reset();
                        self.state.connected.store(true, Ordering::Relaxed);
                        info!(broker = %format!("{}:{}", s.host, s.port), "publisher connected");
                        // Again, in order, what the last connection left
                        // un-acked: PUBACKs pair with this order.
                        for (_, p) in &self.in_flight {
                            if !self.publish(&client, p) {
                                return false;
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        self.state.acked.fetch_add(1, Ordering::Relaxed);
                        if let Some((seq, _)) = self.in_flight.pop_front() {
                            let _ = self.acks.send(seq);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.state.connected.store(false, Ordering::Relaxed);
                        warn!(error = %e, "publisher connection lost; queued messages wait in the store");
                        return false;
                    }
                },
                next = self.feed.recv(), if room => match next {
                    Some((seq, p)) => {
                        let sent = self.publish(&client, &p);
                        self.in_flight.push_back((seq, p));
                        if !sent {
                            return false;
                        }
                    }
                    None => return true,
                },
            }
        }
    }

    /// Hands one message to rumqttc without waiting; false when it could
    /// not take it (the connection is then restarted).
    fn publish(&self, client: &AsyncClient, p: &Publication) -> bool {
        match client.try_publish(p.topic.clone(), QoS::AtLeastOnce, false, p.payload.clone()) {
            Ok(()) => {
                self.state.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                warn!(error = %e, "publisher request queue refused a message");
                false
            }
        }
    }
}
