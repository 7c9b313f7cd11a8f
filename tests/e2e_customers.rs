//! Operator actions on customers through the real binary: profile import
//! and erasure, with the daemon running (through `[admin]`) and stopped
//! (the command opens the store itself).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use touchline_tests::process::ChildProcess;
use touchline_tests::{free_port, wait_for_port, wait_until};

fn touchline(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(touchline_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn erased_at_central(dir: &Path) -> Vec<String> {
    central_records(dir)
        .iter()
        .filter(|r| r["kind"] == "customer_erased")
        .map(|r| r["customer"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_forget_with_the_daemon_running_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let central_dir = dir.path().join("central");
    let central = Central::start(&certs, &central_dir, "127.0.0.1:0".parse().unwrap()).await;
    let http_port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(http_port),
            central: Some(central.addr),
            extra: format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
            ..Default::default()
        },
    );
    let cfg = config.to_str().unwrap();

    // Stopped: the import opens the store itself; a bad line is named.
    let profiles = dir.path().join("profiles.jsonl");
    std::fs::write(
        &profiles,
        "{\"customer\":\"fan-1\",\"profile\":{\"team\":\"A\"}}\n\
         {\"customer\":\"fan-2\",\"profile\":{\"consent\":{\"gamification\":false}}}\n\
         {\"customer\":\"fan-3\"}\n",
    )
    .unwrap();
    let file = profiles.to_str().unwrap();
    let (code, out, err) = touchline(&["profiles", "import", "--config", cfg, file]);
    assert_eq!(code, Some(64), "{out}{err}");
    assert!(out.contains("2 profile update(s) imported"), "{out}");
    assert!(err.contains("profiles.jsonl:3:"), "{err}");
    let (_, out, _) = touchline(&["profiles", "import", "--config", cfg, file]);
    assert!(
        out.contains("0 profile update(s) imported, 2 already"),
        "{out}"
    );

    // Running: fan-2 withdrew consent, so only fan-1 earns the award.
    let mut daemon = ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", cfg],
        &dir.path().join("touchline.log"),
    )
    .unwrap();
    wait_for_port(admin_port, Duration::from_secs(20)).unwrap();
    wait_for_port(http_port, Duration::from_secs(20)).unwrap();
    let events: Vec<_> = (0..6).map(|n| cheer(n, 1 + (n % 2) as u32, 3)).collect();
    let url = format!("http://127.0.0.1:{http_port}/v1/events");
    post_all(
        &reqwest::Client::new(),
        &url,
        &events,
        10,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let d = central_dir.clone();
    assert!(
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(30), || {
            !awards_at_central(&central_records(&d)).is_empty()
        }))
        .await
        .unwrap(),
        "{}",
        daemon.log_text()
    );
    let awards = awards_at_central(&central_records(&central_dir));
    assert_eq!(
        awards.keys().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        ["fan-1"],
        "fan-2 is not tracked"
    );

    let (code, out, err) = touchline(&["forget", "--config", cfg, "fan-1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let d = central_dir.clone();
    assert!(
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(30), || {
            erased_at_central(&d) == ["fan-1"]
        }))
        .await
        .unwrap(),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());

    // Stopped again: forget applies to the store; the record leaves with
    // the next start.
    let (code, out, err) = touchline(&["forget", "--config", cfg, "fan-2"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut daemon = ChildProcess::spawn(
        &touchline_bin(),
        &["run", "--config", cfg],
        &dir.path().join("touchline2.log"),
    )
    .unwrap();
    let d = central_dir.clone();
    assert!(
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(30), || {
            erased_at_central(&d) == ["fan-1", "fan-2"]
        }))
        .await
        .unwrap(),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.terminate(Duration::from_secs(30)).unwrap().success());
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_removes_the_customer_from_the_postgres_sink() {
    if std::env::var("TOUCHLINE_SKIP_PG").as_deref() == Ok("1") {
        eprintln!("skipped: TOUCHLINE_SKIP_PG=1");
        return;
    }
    let pg = touchline_tests::postgres::Postgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let sink = std::sync::Arc::new(
        touchline_central::PostgresSink::connect(&pg.url())
            .await
            .expect("sink"),
    );
    let central =
        Central::start_with(&certs, sink, dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let config = write_site_config(
        dir.path(),
        &SiteOptions {
            http_port: Some(0),
            central: Some(central.addr),
            ..Default::default()
        },
    );
    let daemon = start_daemon(&config).await;
    let url = events_url(&daemon);
    let client = reqwest::Client::new();
    let events: Vec<_> = (0..6).map(|n| cheer(n, 1 + (n % 2) as u32, 3)).collect();
    post_all(&client, &url, &events, 10, Duration::from_secs(30))
        .await
        .unwrap();
    let erase = serde_json::json!({
        "specversion": "1.0", "id": "erase-1", "source": "e2e/crm",
        "type": "customer.erased", "subject": "fan-1"
    });
    post_all(&client, &url, &[erase], 1, Duration::from_secs(30))
        .await
        .unwrap();

    let (db, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let count = |kind: &'static str, customer: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM touchline_records WHERE kind = $1 AND customer = $2",
                &[&kind, &customer],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count("customer_erased", "fan-1").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no erasure record arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count("achievement_awarded", "fan-1").await, 0, "erased");
    assert_eq!(count("achievement_awarded", "fan-2").await, 1, "untouched");
    daemon.shutdown(Duration::from_secs(5)).await;
    central.stop().await;
}
