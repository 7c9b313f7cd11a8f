//! The receiver over real QUIC on loopback: sessions, exactly-once writes,
//! restarts, torn files and who is let in.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::sync::oneshot;
use touchline_central::{serve, tls, JsonlSink};
use touchline_proto::{
    decode_server, encode_client, AchievementAwarded, ClientMessage, Record, RecordBody,
    RefusalReason, ServerMessage, PROTOCOL_VERSION,
};

/// A CA with a central certificate and site certificates, as PEM.
struct Pki {
    ca: String,
    central: (String, String),
    ca_key: KeyPair,
    ca_params: CertificateParams,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let mut pki = Pki {
            ca,
            central: (String::new(), String::new()),
            ca_key,
            ca_params,
        };
        pki.central = pki.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        pki
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn site(&self, site: &str) -> (String, String) {
        self.leaf(&[site], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(pki: &Pki, dir: &Path, addr: SocketAddr) -> Server {
        let config = tls::server_config_pem(
            pki.central.0.as_bytes(),
            pki.central.1.as_bytes(),
            pki.ca.as_bytes(),
        )
        .unwrap();
        let endpoint = quinn::Endpoint::server(config, addr).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let sink = Arc::new(JsonlSink::open(dir).unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(endpoint, sink, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// A raw protocol client, to say things a well-behaved site never would.
struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Client {
    async fn connect(ca: &str, cert: &str, key: &str, addr: SocketAddr) -> Result<Client, String> {
        let config = tls::client_config_pem(
            ca.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .map_err(|e| e.to_string())?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(Client {
            _endpoint: endpoint,
            conn,
        })
    }

    async fn request(&self, msg: &ClientMessage) -> Result<ServerMessage, String> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&encode_client(msg).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let bytes = recv.read_to_end(1 << 24).await.map_err(|e| e.to_string())?;
        decode_server(&bytes).map_err(|e| e.to_string())
    }

    async fn hello(&self, site: &str) -> Result<ServerMessage, String> {
        self.request(&ClientMessage::Hello {
            site: site.into(),
            protocol_version: PROTOCOL_VERSION,
        })
        .await
    }

    async fn batch(
        &self,
        dropped_through: u64,
        records: Vec<Record>,
    ) -> Result<ServerMessage, String> {
        self.request(&ClientMessage::Batch {
            dropped_through,
            records,
        })
        .await
    }
}

fn record(site: &str, seq: u64) -> Record {
    Record {
        site: site.into(),
        seq,
        at_ms: 1_700_000_000_000 + seq as i64,
        body: RecordBody::AchievementAwarded(AchievementAwarded {
            customer: format!("c{seq}"),
            achievement: "cheer-leader".into(),
            version: 1,
            tier: 1,
            badge: Some("cheer-bronze".into()),
            points: vec![("xp".into(), 50)],
            window: "lifetime".into(),
            value: 10.0,
        }),
    }
}

fn lines(dir: &Path, site: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(format!("{site}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn batches_are_written_once_and_acknowledged_contiguously() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    let (cert, key) = pki.site("arena-1");
    let client = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();

    assert_eq!(
        client.hello("arena-1").await.unwrap(),
        ServerMessage::Welcome { last_durable: 0 }
    );
    let first: Vec<_> = (1..=5).map(|s| record("arena-1", s)).collect();
    assert_eq!(
        client.batch(0, first.clone()).await.unwrap(),
        ServerMessage::Ack { through: 5 }
    );
    // The same batch again (a lost ack): nothing new is written.
    assert_eq!(
        client.batch(0, first).await.unwrap(),
        ServerMessage::Ack { through: 5 }
    );
    // A gap the site did not declare: only the contiguous part counts.
    let gappy = vec![record("arena-1", 6), record("arena-1", 8)];
    assert_eq!(
        client.batch(0, gappy).await.unwrap(),
        ServerMessage::Ack { through: 6 }
    );
    // A declared gap (drop-oldest) is crossed.
    assert_eq!(
        client.batch(8, vec![record("arena-1", 9)]).await.unwrap(),
        ServerMessage::Ack { through: 9 }
    );

    let written = lines(dir.path(), "arena-1");
    let seqs: Vec<u64> = written.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 9]);
    assert_eq!(written[0]["kind"], "achievement_awarded");
    assert_eq!(written[0]["site"], "arena-1");
    assert_eq!(written[0]["points"]["xp"], 50);
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_receiver_remembers_and_cuts_a_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    let addr = server.addr;
    let (cert, key) = pki.site("arena-2");
    let client = Client::connect(&pki.ca, &cert, &key, addr).await.unwrap();
    client.hello("arena-2").await.unwrap();
    let batch: Vec<_> = (1..=3).map(|s| record("arena-2", s)).collect();
    client.batch(0, batch).await.unwrap();
    drop(client);
    server.stop().await;

    // A crash in the middle of a write leaves half a line behind.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("arena-2.jsonl"))
        .unwrap();
    f.write_all(br#"{"site":"arena-2","seq":4,"ki"#).unwrap();
    drop(f);

    let server = Server::start(&pki, dir.path(), addr).await;
    let client = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    assert_eq!(
        client.hello("arena-2").await.unwrap(),
        ServerMessage::Welcome { last_durable: 3 }
    );
    let batch: Vec<_> = (2..=4).map(|s| record("arena-2", s)).collect();
    assert_eq!(
        client.batch(0, batch).await.unwrap(),
        ServerMessage::Ack { through: 4 }
    );
    let seqs: Vec<u64> = lines(dir.path(), "arena-2")
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let other = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    // Trusts the right central CA but presents a certificate of another CA.
    let (cert, key) = other.site("arena-3");
    let refused = match Client::connect(&pki.ca, &cert, &key, server.addr).await {
        Err(_) => true,
        // TLS 1.3 may finish the client side before the server rejects.
        Ok(client) => client.hello("arena-3").await.is_err(),
    };
    assert!(refused, "a foreign certificate got a session");
    assert!(lines(dir.path(), "arena-3").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_hello_for_another_site_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    let (cert, key) = pki.site("arena-4");
    let client = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    match client.hello("arena-5").await.unwrap() {
        ServerMessage::Refused { reason, .. } => assert_eq!(reason, RefusalReason::SiteMismatch),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn records_of_another_site_and_batches_before_hello_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    let (cert, key) = pki.site("arena-6");

    let early = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    match early.batch(0, vec![record("arena-6", 1)]).await.unwrap() {
        ServerMessage::Refused { reason, .. } => {
            assert_eq!(reason, RefusalReason::ProtocolViolation)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let client = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    client.hello("arena-6").await.unwrap();
    match client.batch(0, vec![record("arena-7", 1)]).await.unwrap() {
        ServerMessage::Refused { reason, .. } => {
            assert_eq!(reason, RefusalReason::ProtocolViolation)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(lines(dir.path(), "arena-6").is_empty());
    assert!(lines(dir.path(), "arena-7").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn garbage_on_a_stream_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(&pki, dir.path(), any_addr()).await;
    let (cert, key) = pki.site("arena-8");
    let bad = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    let (mut send, mut recv) = bad.conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
    send.finish().unwrap();
    // The site hears why (an older receiver meeting a newer record kind
    // looks the same), then the connection closes.
    let answer = recv.read_to_end(1024).await.unwrap();
    match decode_server(&answer).unwrap() {
        ServerMessage::Refused { reason, message } => {
            assert_eq!(reason, RefusalReason::ProtocolViolation);
            assert!(message.contains("cannot read the request"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), bad.conn.closed()).await;
    assert!(closed.is_ok(), "the connection stays open");

    let good = Client::connect(&pki.ca, &cert, &key, server.addr)
        .await
        .unwrap();
    assert_eq!(
        good.hello("arena-8").await.unwrap(),
        ServerMessage::Welcome { last_durable: 0 }
    );
    server.stop().await;
}
