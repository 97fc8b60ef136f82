//! Event sinks against real components started by the tests on loopback ports: a mosquitto
//! broker of the test's own (every event on its topic; QoS 1 across a broker restart: every
//! event sent is received), an HTTP webhook receiver (POSTed JSON, a failed request retried),
//! and a broker that refuses the connection (failures counted, the analysis goes on, no
//! hang); a TLS listener with a CA and server certificate made by the test (`openssl`) and a
//! password file (`mosquitto_passwd`): the sink with the rules file's CA and credentials
//! delivers every event, a wrong password is counted. Each run has a deadline.

mod common;

use common::{Broker, demo_model, run, spawn, wait, wait_until};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

const RULES: &str = "rules:
  - {name: left, question: \"how many objects are in the left zone?\", when: changes}
  - {name: crowded, question: \"how many objects are there?\", when: {at_least: 4}}
";

/// Two sources and the sinks section.
fn write_rules(dir: &Path, frames: u64, pace: &str, sinks: &str) -> String {
    let path = dir.join("rules.yaml");
    std::fs::write(
        &path,
        format!(
            "frames: {frames}\nwindow: 2\nsources:\n  - {{name: gate, uri: \"synthetic://scene?seed=3&{pace}\"}}\n  - {{name: dock, uri: \"synthetic://scene?seed=5&{pace}\"}}\nsinks:\n{sinks}{RULES}"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// The events on stdout (records with a `seq`), by seq.
fn events(stdout: &[Value]) -> BTreeMap<u64, Value> {
    stdout
        .iter()
        .filter_map(|r| Some((r["seq"].as_u64()?, r.clone())))
        .collect()
}

/// The topic an event belongs on.
fn topic_of(e: &Value) -> String {
    let key = e["rule"].as_str().or(e["event"].as_str()).unwrap();
    format!("jetvlm/{}/{key}", e["source"].as_str().unwrap())
}

/// A sink's summary line numbers: (events, delivered, dropped, errors).
fn counts(stderr: &str, sink: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("jetvlm-analytics: {sink} (")))
        .unwrap_or_else(|| panic!("no {sink} summary: {stderr}"));
    let tail = &line[line.find("): ").unwrap() + 3..];
    let n: Vec<u64> = tail
        .split(", ")
        .map(|p| p.split(' ').next().unwrap().parse().unwrap())
        .collect();
    (n[0], n[1], n[2], n[3])
}

/// `mosquitto_sub` on `jetvlm/#` with a persistent QoS 1 session (it reconnects by itself
/// after a broker restart; the broker keeps its session and queued messages in its
/// persistence file meanwhile); lines `topic payload` go to `out`. `conn`: the client's TLS
/// and credential options.
fn subscribe(port: u16, out: &Path, client: &str, conn: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "jetvlm/#",
            "-v",
        ])
        .args(conn)
        .args(["-q", "1", "-c", "-i", client])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients; .ci/setup installs it)")
}

/// Publishes probes until the subscriber has one: it is subscribed.
fn until_subscribed(port: u16, out: &Path, conn: &[&str]) {
    assert!(
        wait_until(Duration::from_secs(15), || {
            let _ = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-t",
                    "jetvlm/probe",
                    "-m",
                    "{}",
                ])
                .args(conn)
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
            std::fs::read_to_string(out)
                .unwrap_or_default()
                .contains("jetvlm/probe")
        }),
        "the subscriber never got a probe"
    );
}

/// The subscriber's (topic, event) lines, probes and status left out.
fn received(out: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            let v: Value = serde_json::from_str(payload).ok()?;
            v.get("seq")?;
            Some((topic.to_string(), v))
        })
        .collect()
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn mqtt_gets_every_event_on_its_topic_across_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let sub_out = dir.path().join("sub.txt");
    let sub = subscribe(broker.port, &sub_out, "test-sub", &[]);
    until_subscribed(broker.port, &sub_out, &[]);
    // Paced sources (10 frames/s, 40 frames): the run lasts seconds, the broker goes away
    // and comes back in the middle of it.
    let rules = write_rules(
        dir.path(),
        40,
        "fps=10",
        &format!(
            "  mqtt: {{url: \"mqtt://127.0.0.1:{}\", qos: 1, client_id: cams-1, flush_timeout_ms: 20000}}\n",
            broker.port
        ),
    );
    let model = demo_model();
    let child = spawn(&[&rules, "--model", model.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(60), || received(&sub_out).len() >= 3),
        "no events reached the broker"
    );
    broker.down();
    std::thread::sleep(Duration::from_millis(1500));
    broker.up();
    let out = wait(child, LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let sent = events(&out.records());
    assert!(sent.len() >= 6, "{}", out.stdout);
    // Every event arrives (QoS 1: at least once; copies share their seq, so events are
    // counted by distinct seq), on its topic.
    let complete = wait_until(Duration::from_secs(20), || {
        let got: BTreeSet<u64> = received(&sub_out)
            .iter()
            .filter_map(|(_, v)| v["seq"].as_u64())
            .collect();
        got.len() == sent.len()
    });
    let got = received(&sub_out);
    stop(sub);
    assert!(
        complete,
        "sent {} events, received {:?}: {}",
        sent.len(),
        got.len(),
        out.stderr
    );
    for (topic, v) in &got {
        let seq = v["seq"].as_u64().unwrap();
        let e = sent
            .get(&seq)
            .unwrap_or_else(|| panic!("unknown event {v}"));
        assert_eq!(v, e, "the payload is the stdout line");
        assert_eq!(*topic, topic_of(e));
    }
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "mqtt");
    assert_eq!(
        (offered, delivered, dropped),
        (sent.len() as u64, sent.len() as u64, 0)
    );
    assert!(errors >= 1, "the restart was seen: {}", out.stderr);
    // The retained status says the run ended.
    let status = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", "jetvlm/cams-1/status", "-C", "1", "-W", "10"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).expect("a retained status");
    assert_eq!(status["status"], "offline");
}

/// Runs `openssl` with `args` in `dir`; fails the test on an error.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`) and a server certificate it signed for 127.0.0.1 and localhost
/// (`server.crt`, `server.key`), P-256 keys, valid for a day.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=jetvlm test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

#[test]
fn mqtts_with_the_rules_files_ca_and_a_password_gets_every_event_and_a_wrong_password_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(d.join("passwd"))
        .args(["jetvlm", "s3cret-pw"])
        .output()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(made.status.success(), "{made:?}");
    let broker = Broker::start_with(
        d,
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            d.join("passwd").display()
        ),
        &format!(
            "cafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n",
            d.display()
        ),
    );
    let ca = d.join("ca.crt");
    let conn = [
        "--cafile",
        ca.to_str().unwrap(),
        "-u",
        "jetvlm",
        "-P",
        "s3cret-pw",
    ];
    let sub_out = d.join("sub.txt");
    let sub = subscribe(broker.port, &sub_out, "tls-sub", &conn);
    until_subscribed(broker.port, &sub_out, &conn);
    // The CA file is named relative to the rules file (both in the test's directory).
    let sink = |password: &str| {
        format!(
            "  mqtt: {{url: \"mqtts://127.0.0.1:{}\", username: jetvlm, password: \"{password}\", tls: {{ca: ca.crt}}, qos: 1, client_id: tls-1, flush_timeout_ms: 3000}}\n",
            broker.port
        )
    };
    let model = demo_model();
    let rules = write_rules(d, 8, "pace=0", &sink("s3cret-pw"));
    let out = run(&[&rules, "--model", model.to_str().unwrap()], LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let sent = events(&out.records());
    assert!(sent.len() >= 4, "{}", out.stdout);
    let complete = wait_until(Duration::from_secs(20), || {
        let got: BTreeSet<u64> = received(&sub_out)
            .iter()
            .filter_map(|(_, v)| v["seq"].as_u64())
            .collect();
        got.len() == sent.len()
    });
    let got = received(&sub_out);
    stop(sub);
    assert!(
        complete,
        "sent {}, received {}: {}",
        sent.len(),
        got.len(),
        out.stderr
    );
    for (topic, v) in &got {
        let e = &sent[&v["seq"].as_u64().unwrap()];
        assert_eq!(v, e, "the payload is the stdout line");
        assert_eq!(*topic, topic_of(e));
    }
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "mqtt");
    assert_eq!(
        (offered, delivered, dropped, errors),
        (sent.len() as u64, sent.len() as u64, 0, 0),
        "{}",
        out.stderr
    );

    // The wrong password: the broker refuses the client; counted, said once, the analysis
    // runs to the end, and no password is printed.
    let rules = write_rules(d, 4, "pace=0", &sink("wrong-pw"));
    let out = run(&[&rules, "--model", model.to_str().unwrap()], LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let sent = events(&out.records()).len() as u64;
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "mqtt");
    assert_eq!(
        (offered, delivered, dropped),
        (sent, 0, sent),
        "{}",
        out.stderr
    );
    assert!(errors >= 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("source gate: 4 frames, 4 analysed"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("wrong-pw") && !out.stdout.contains("wrong-pw"),
        "{}",
        out.stderr
    );
    eprintln!(
        "wrong password: {}",
        out.stderr
            .lines()
            .find(|l| l.contains("mqtts://"))
            .unwrap_or("")
    );
}

#[test]
fn a_broker_that_refuses_the_connection_is_counted_and_the_analysis_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let rules = write_rules(
        dir.path(),
        6,
        "pace=0",
        &format!("  mqtt: {{url: \"mqtt://127.0.0.1:{port}\", qos: 1, flush_timeout_ms: 300}}\n"),
    );
    let model = demo_model();
    let out = run(
        &[&rules, "--model", model.to_str().unwrap()],
        Duration::from_secs(90),
    );
    assert!(out.ok, "{}", out.stderr);
    let sent = events(&out.records());
    assert!(!sent.is_empty());
    assert!(
        out.stderr.contains("source gate: 6 frames, 6 analysed"),
        "{}",
        out.stderr
    );
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "mqtt");
    assert_eq!(
        (offered, delivered, dropped),
        (sent.len() as u64, 0, sent.len() as u64)
    );
    assert!(errors >= 1, "{}", out.stderr);
    // Said once on stderr, naming the broker.
    let said = out
        .stderr
        .lines()
        .filter(|l| l.contains(&format!("mqtt mqtt://127.0.0.1:{port}")))
        .count();
    assert_eq!(said, 1, "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
}

/// The bodies a receiver accepted, and how many requests it got.
type Bodies = Arc<Mutex<Vec<Value>>>;
type Requests = Arc<Mutex<u32>>;

/// A webhook receiver: answers 500 to the first request, 200 to the others; keeps the
/// bodies of the requests it accepted.
fn receiver() -> (u16, Bodies, Requests) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(Mutex::new(0u32));
    let (b, n) = (bodies.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let first = {
                let mut n = n.lock().unwrap();
                *n += 1;
                *n == 1
            };
            let status = if first || !request_line.starts_with("POST /events ") {
                "500 Internal Server Error"
            } else {
                b.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, bodies, requests)
}

#[test]
fn the_webhook_gets_every_event_as_json_and_a_failed_post_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (port, bodies, requests) = receiver();
    let rules = write_rules(
        dir.path(),
        6,
        "pace=0",
        &format!(
            "  webhook: {{url: \"http://127.0.0.1:{port}/events\", retries: 2, backoff_ms: 50}}\n"
        ),
    );
    let model = demo_model();
    let out = run(&[&rules, "--model", model.to_str().unwrap()], LIMIT);
    assert!(out.ok, "{}", out.stderr);
    let sent = events(&out.records());
    assert!(!sent.is_empty());
    let got: BTreeMap<u64, Value> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|v| (v["seq"].as_u64().unwrap(), v.clone()))
        .collect();
    assert_eq!(got, sent, "every event POSTed once, in full");
    assert_eq!(
        *requests.lock().unwrap() as usize,
        sent.len() + 1,
        "one retry"
    );
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "webhook");
    assert_eq!(
        (offered, delivered, dropped, errors),
        (sent.len() as u64, sent.len() as u64, 0, 1)
    );

    // No receiver: every attempt fails, counted; the run ends in time.
    let dead = common::free_port();
    let rules = write_rules(
        dir.path(),
        3,
        "pace=0",
        &format!(
            "  webhook: {{url: \"http://127.0.0.1:{dead}/events\", retries: 1, backoff_ms: 10, timeout_ms: 500, flush_timeout_ms: 3000}}\n"
        ),
    );
    let out = run(
        &[&rules, "--model", model.to_str().unwrap()],
        Duration::from_secs(90),
    );
    assert!(out.ok, "{}", out.stderr);
    let n = events(&out.records()).len() as u64;
    let (offered, delivered, dropped, errors) = counts(&out.stderr, "webhook");
    assert_eq!(
        (offered, delivered, dropped, errors),
        (n, 0, n, 2 * n),
        "{}",
        out.stderr
    );
}
