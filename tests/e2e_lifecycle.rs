//! The daemon as a system service: readiness and watchdog as systemd sees
//! them, SIGTERM drain, SIGHUP and `touchline reload`, and the
//! one-instance-per-data-directory rule. The real binary runs as a child
//! process; the service manager's side of `sd_notify` is a datagram
//! socket the test owns.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use touchline_tests::mosquitto::Mosquitto;
use touchline_tests::process::ChildProcess;
use touchline_tests::{free_port, free_udp_port, wait_for_port, wait_until};

/// The service manager's end of `NOTIFY_SOCKET`: every datagram received,
/// in order.
struct ServiceManager {
    path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
}

impl ServiceManager {
    fn listen(dir: &Path) -> ServiceManager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push(text);
            }
        });
        ServiceManager { path, messages }
    }

    fn env(&self) -> String {
        self.path.to_str().unwrap().to_string()
    }

    fn received(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.received().iter().filter(|m| pred(m)).count()
    }

    fn wait_for(&self, within: Duration, pred: impl Fn(&str) -> bool) -> bool {
        wait_until(within, || self.count(&pred) > 0)
    }
}

fn is_ready(m: &str) -> bool {
    m.lines().any(|l| l == "READY=1")
}

fn spawn_touchline(
    dir: &Path,
    config: &Path,
    extra_args: &[&str],
    env: &[(&str, &str)],
    log: &str,
) -> ChildProcess {
    let mut args = vec!["run", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    ChildProcess::spawn_with_env(&touchline_bin(), &args, env, &dir.join(log)).unwrap()
}

async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    match client.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn post_events(url: &str, events: &[Value]) -> (u16, Option<String>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    match client
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events.to_vec()).to_string())
        .send()
        .await
    {
        Ok(r) => (
            r.status().as_u16(),
            r.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        ),
        Err(_) => (0, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_broker_then_watchdog_and_stop_follow() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start().expect("mosquitto");
    // The broker is down when the daemon starts: READY must wait for it.
    broker.stop();
    let admin_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            mqtt_port: Some(broker.port),
            extra: format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
            ..Default::default()
        },
    );
    let manager = ServiceManager::listen(dir.path());
    let socket = manager.env();
    let mut daemon = spawn_touchline(
        dir.path(),
        &config,
        &[],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "2000000")],
        "touchline.log",
    );

    assert!(
        manager.wait_for(Duration::from_secs(20), |m| m.contains("waiting for")
            && m.contains("mqtt")),
        "no STATUS naming the broker wait; got {:?}\n{}",
        manager.received(),
        daemon.log_text()
    );
    wait_for_port(admin_port, Duration::from_secs(10)).unwrap();
    let (code, body) = get(&format!("http://127.0.0.1:{admin_port}/readyz")).await;
    assert_eq!(code, 503, "not ready without the broker: {body}");
    assert_eq!(
        manager.count(is_ready),
        0,
        "READY=1 before the broker was up"
    );

    broker.restart().expect("broker starts");
    assert!(
        manager.wait_for(Duration::from_secs(20), is_ready),
        "no READY=1 after the broker came up; got {:?}\n{}",
        manager.received(),
        daemon.log_text()
    );
    let (code, body) = get(&format!("http://127.0.0.1:{admin_port}/readyz")).await;
    assert_eq!(code, 200, "ready once READY=1 was sent: {body}");
    let ready = manager
        .received()
        .into_iter()
        .find(|m| is_ready(m))
        .unwrap();
    assert!(ready.contains("STATUS="), "READY carries a status: {ready}");

    // An idle daemon keeps its watchdog fed (the interval is 2 s).
    assert!(
        wait_until(Duration::from_secs(10), || manager
            .count(|m| m == "WATCHDOG=1")
            >= 3),
        "watchdog pings: {:?}",
        manager.received()
    );

    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(manager.count(|m| m.contains("STOPPING=1")) > 0);
    // A clean MQTT DISCONNECT, not a dropped socket.
    let client = format!("touchline-{SITE}");
    assert!(
        wait_until(Duration::from_secs(5), || broker
            .log_text()
            .contains(&format!("Client {client} disconnected"))),
        "broker log shows no clean disconnect:\n{}",
        broker.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_503_drains_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    // The central side is down: the drain grace runs out and records wait
    // in the outbox for the next start.
    let central_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port().unwrap())
        .parse()
        .unwrap();
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central_addr),
            ..Default::default()
        },
    );
    let mut daemon = spawn_touchline(dir.path(), &config, &["--drain", "3s"], &[], "run1.log");
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");

    let events = workload(2_000, 50);
    let expected = expected_awards(&events);
    let client = reqwest::Client::new();
    post_all(&client, &url, &events, 100, Duration::from_secs(60))
        .await
        .expect("events accepted");

    daemon.signal("TERM").unwrap();
    // The signal is handled asynchronously: a request that lands before the
    // daemon shut its input is legitimately accepted (and committed), so
    // probe only once the daemon says input is closed.
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .log_text()
            .contains("input closed")),
        "no 'input closed' after SIGTERM\n{}",
        daemon.log_text()
    );
    // During the drain, new input is refused with 503 and Retry-After.
    let probe = vec![cheer(1_000_000, 1, 3)];
    let mut refused = None;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        match post_events(&url, &probe).await {
            (503, retry) => {
                refused = retry;
                break;
            }
            (202, _) => panic!("input accepted after SIGTERM"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(
        refused.as_deref(),
        Some("5"),
        "no 503 with Retry-After while draining\n{}",
        daemon.log_text()
    );
    let status = daemon.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(daemon.log_text().contains("grace period"));

    // With the central side up, the next start delivers every award once.
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, central_addr).await;
    let mut daemon = spawn_touchline(dir.path(), &config, &[], &[], "run2.log");
    let dir2 = central_dir.clone();
    let n = expected.len();
    let arrived = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(60), || {
            awards_at_central(&central_records(&dir2))
                .values()
                .sum::<usize>()
                >= n
        })
    })
    .await
    .unwrap();
    assert!(arrived, "awards missing\n{}", daemon.log_text());
    assert_eq!(awards_at_central(&central_records(&central_dir)), expected);
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    central.stop().await;
}

const RULES_V2: &str = r#"
[[achievement]]
id = "cheer-leader"
name = "Cheer Leader"
version = 2
on = ["fan.cheer"]
measure = "count"
window = "lifetime"
tiers = [ { at = 1, badge = "cheer-first", points = { xp = 5 } } ]

[[achievement]]
id = "ticket-holder"
name = "Ticket holder"
on = ["ticket.scanned"]
measure = "count"
window = "lifetime"
tiers = [ { at = 1, badge = "ticket" } ]
"#;

/// Rule id@version pairs the running daemon reports.
async fn rule_versions(admin: &str) -> Vec<String> {
    let (code, body) = get(&format!("{admin}/v1/status")).await;
    if code != 200 {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out: Vec<String> = v["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| format!("{}@{}", r["id"].as_str().unwrap_or(""), r["version"]))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn wait_for_versions(admin: &str, want: &[&str]) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < until {
        if rule_versions(admin).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_reload_swap_rules_and_refuse_an_invalid_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port().unwrap();
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            extra: format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
            ..Default::default()
        },
    );
    let mut daemon = spawn_touchline(dir.path(), &config, &[], &[], "touchline.log");
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert!(
        wait_for_versions(&admin, &["cheer-leader@1"]).await,
        "{}",
        daemon.log_text()
    );

    // SIGHUP picks up a new version and a new rule.
    let rules_file = dir.path().join("rules/e2e.toml");
    std::fs::write(&rules_file, RULES_V2).unwrap();
    daemon.signal("HUP").unwrap();
    assert!(
        wait_for_versions(&admin, &["cheer-leader@2", "ticket-holder@1"]).await,
        "SIGHUP did not reload: {:?}\n{}",
        rule_versions(&admin).await,
        daemon.log_text()
    );
    // The new version is the one that awards.
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    assert_eq!(post_events(&url, &[cheer(1, 7, 1)]).await.0, 202);
    let (_, metrics) = get(&format!("{admin}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("touchline_rule_awards_total{rule=\"cheer-leader\",version=\"2\"} 1")),
        "award under version 2 expected:\n{metrics}"
    );

    // An invalid bundle: `touchline reload` shows where and exits 64,
    // SIGHUP logs it, and the daemon keeps the rules it had.
    std::fs::write(
        &rules_file,
        "[[achievement]]\nid = \"broken\"\nname = \"Broken\"\non = [\"fan.cheer\"]\nmeasure = \"count\"\nwindow = \"lifetime\"\ntiers = []\n",
    )
    .unwrap();
    let out = std::process::Command::new(touchline_bin())
        .args(["reload", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "reload of a broken bundle: {stderr}"
    );
    assert!(
        stderr.contains("e2e.toml:"),
        "errors name the file: {stderr}"
    );
    daemon.signal("HUP").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || daemon
            .log_text()
            .contains("reload refused")),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        rule_versions(&admin).await,
        ["cheer-leader@2", "ticket-holder@1"],
        "the old rules must stay active"
    );

    // `touchline reload` with a valid bundle answers what changed.
    std::fs::write(&rules_file, RULES).unwrap();
    let out = std::process::Command::new(touchline_bin())
        .args(["reload", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("removed: ticket-holder"), "{stdout}");
    assert!(stdout.contains("cheer-leader@2→1"), "{stdout}");
    assert!(wait_for_versions(&admin, &["cheer-leader@1"]).await);
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            ..Default::default()
        },
    );
    let mut first = spawn_touchline(dir.path(), &config, &[], &[], "first.log");
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();

    // Same data_dir, another HTTP port: only the lock stands in the way.
    let other = dir.path().join("other.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&http_port.to_string(), &free_port().unwrap().to_string())
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", dir.path().join("data").display()),
        );
    std::fs::write(&other, text).unwrap();
    let mut second = spawn_touchline(dir.path(), &other, &[], &[], "second.log");
    let status = second.wait(Duration::from_secs(20)).unwrap();
    assert!(!status.success(), "second instance must not run");
    let log = second.log_text();
    assert!(
        log.contains("already running") && log.contains(&first.pid().to_string()),
        "{log}"
    );
    assert!(first.is_running());
    assert!(first.terminate(Duration::from_secs(30)).unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_and_duplicate_no_award() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central = Central::start(
        &certs,
        &dir.path().join("central"),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let http_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central.addr),
            ..Default::default()
        },
    );
    let mut daemon = spawn_touchline(dir.path(), &config, &[], &[], "touchline.log");
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();

    let events = workload(20_000, 300);
    let expected = expected_awards(&events);
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    let loader = tokio::spawn(async move {
        let client = reqwest::Client::new();
        post_all(&client, &url, &events, 100, Duration::from_secs(120)).await
    });

    // The award rule stays as it is; another rule comes and goes, so every
    // reload really swaps the engine while events are being committed.
    let rules_file = dir.path().join("rules/e2e.toml");
    let extra = "\n[[achievement]]\nid = \"ticket-holder\"\nname = \"Ticket holder\"\non = [\"ticket.scanned\"]\nmeasure = \"count\"\nwindow = \"lifetime\"\ntiers = [ { at = 1 } ]\n";
    let mut reloads = 0;
    while !loader.is_finished() && reloads < 40 {
        let text = if reloads % 2 == 0 {
            format!("{RULES}{extra}")
        } else {
            RULES.to_string()
        };
        std::fs::write(&rules_file, text).unwrap();
        daemon.signal("HUP").unwrap();
        reloads += 1;
        let seen = reloads;
        let log_dir = dir.path().to_path_buf();
        // Each reload is logged before the next is sent.
        let logged = tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(20), || {
                std::fs::read_to_string(log_dir.join("touchline.log"))
                    .unwrap_or_default()
                    .matches("rules reloaded")
                    .count()
                    >= seen
            })
        })
        .await
        .unwrap();
        assert!(logged, "reload {seen} not logged\n{}", daemon.log_text());
    }
    loader.await.unwrap().expect("all events accepted");
    assert!(
        reloads >= 3,
        "the load ended before enough reloads ({reloads})"
    );

    let central_dir = dir.path().join("central");
    let n = expected.len();
    let dir2 = central_dir.clone();
    let arrived = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(60), || {
            awards_at_central(&central_records(&dir2))
                .values()
                .sum::<usize>()
                >= n
        })
    })
    .await
    .unwrap();
    assert!(arrived, "awards missing\n{}", daemon.log_text());
    let records = central_records(&central_dir);
    assert_eq!(
        awards_at_central(&records),
        expected,
        "awards lost or duplicated"
    );
    assert_sequences_unique(&records);
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    central.stop().await;
}
