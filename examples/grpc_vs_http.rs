//! Load client for `bench/grpc`: the same verify decision asked over HTTP
//! (`GET /v1/verify`, one keep-alive connection per in-flight request) and
//! over Envoy's gRPC `Check` (HTTP/2 channels, requests multiplexed), and
//! HTTP verify on an instance with `upstream_assertion` on, in interleaved
//! rounds of one run. Prints req/s, p50 and p99 per row and round, and the
//! medians. Every answer must be 200 / OK, else it exits 1.
//!
//! Not a test (benchmarks go in bench/): `bench/grpc` builds it in release
//! mode and runs it against release builds of sessiongate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};

#[derive(Parser)]
struct Args {
    /// sessiongate's HTTP address (assertion off), e.g. http://127.0.0.1:8080
    #[arg(long)]
    http: String,
    /// The same instance's gRPC listener, e.g. 127.0.0.1:9191
    #[arg(long)]
    grpc: String,
    /// An instance on the same Redis with upstream_assertion on.
    #[arg(long)]
    http_assertion: Option<String>,
    #[arg(long)]
    issuer_key: String,
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the gRPC requests share.
    #[arg(long, default_value_t = 8)]
    grpc_connections: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct Outcome {
    done: u64,
    failed: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&mut self, p: f64) -> f64 {
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
    }
}

fn check_request(token: &str) -> CheckRequest {
    let http = attribute_context::HttpRequest {
        method: "GET".into(),
        host: "app.example".into(),
        scheme: "https".into(),
        path: "/api/orders/7".into(),
        protocol: "HTTP/1.1".into(),
        headers: [
            ("authorization".to_string(), format!("Bearer {token}")),
            ("user-agent".to_string(), "bench".to_string()),
            (":authority".to_string(), "app.example".to_string()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Runs `concurrency` loops of `one` for `seconds`.
async fn drive<F, Fut>(concurrency: usize, seconds: u64, one: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let one = Arc::new(one);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let one = one.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut done, mut failed, mut lat) = (0u64, 0u64, Vec::with_capacity(1 << 16));
            let mut n = worker as u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if one(worker, n).await {
                    done += 1;
                } else {
                    failed += 1;
                }
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                n += concurrency as u64;
            }
            (done, failed, lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Outcome {
        done: 0,
        failed: 0,
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (d, f, l) = t.await.unwrap();
        out.done += d;
        out.failed += f;
        out.latencies_us.extend(l);
    }
    out.elapsed = started.elapsed();
    out
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .unwrap();
    let mut tokens = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let res = http
            .post(format!("{}/v1/sessions", args.http))
            .bearer_auth(&args.issuer_key)
            .json(&serde_json::json!({"user_id": format!("u{i}"), "device_id": "d"}))
            .send()
            .await
            .expect("create a session");
        assert_eq!(res.status(), 201, "create");
        let body: serde_json::Value = res.json().await.unwrap();
        tokens.push(body["token"].as_str().unwrap().to_string());
    }
    let tokens = Arc::new(tokens);
    let mut channels = Vec::new();
    for _ in 0..args.grpc_connections.max(1) {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", args.grpc))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect to the gRPC listener"),
        );
    }
    let channels = Arc::new(channels);

    // Per row: one measurement triple per round.
    type Rounds = Vec<(f64, f64, f64)>;
    let mut rows: Vec<(&str, Rounds)> =
        vec![("HTTP GET /v1/verify", vec![]), ("gRPC Check", vec![])];
    if args.http_assertion.is_some() {
        rows.push(("HTTP /v1/verify + X-Session-Assertion", vec![]));
    }
    let mut failed_any = false;
    for round in 0..args.rounds {
        // Rotate the order each round so no row always runs first.
        let n = rows.len();
        for k in 0..n {
            let row = (k + round) % n;
            let mut out = match row {
                0 | 2 => {
                    let base = if row == 0 {
                        args.http.clone()
                    } else {
                        args.http_assertion.clone().unwrap()
                    };
                    let (client, tokens) = (http.clone(), tokens.clone());
                    let want_assertion = row == 2;
                    drive(args.concurrency, args.seconds, move |_, n| {
                        let req = client
                            .get(format!("{base}/v1/verify"))
                            .bearer_auth(&tokens[n as usize % tokens.len()]);
                        async move {
                            match req.send().await {
                                Ok(r) => {
                                    r.status() == 200
                                        && (!want_assertion
                                            || r.headers().contains_key("x-session-assertion"))
                                }
                                Err(_) => false,
                            }
                        }
                    })
                    .await
                }
                _ => {
                    let (channels, tokens) = (channels.clone(), tokens.clone());
                    drive(args.concurrency, args.seconds, move |worker, n| {
                        let mut client =
                            AuthorizationClient::new(channels[worker % channels.len()].clone());
                        let request = check_request(&tokens[n as usize % tokens.len()]);
                        async move {
                            match client.check(request).await {
                                Ok(r) => r.into_inner().status.is_some_and(|s| s.code == 0),
                                Err(_) => false,
                            }
                        }
                    })
                    .await
                }
            };
            let (p50, p99) = (out.pct(0.50), out.pct(0.99));
            println!(
                "round {} {:<40} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  failed {}",
                round + 1,
                rows[row].0,
                out.rps(),
                p50,
                p99,
                out.failed
            );
            failed_any |= out.failed > 0;
            rows[row].1.push((out.rps(), p50, p99));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "\nmedians of {} rounds ({} s each, {} in flight, {} sessions):",
        args.rounds, args.seconds, args.concurrency, args.sessions
    );
    let mut http_rps = 0.0;
    for (i, (name, results)) in rows.iter().enumerate() {
        let mut rps: Vec<f64> = results.iter().map(|r| r.0).collect();
        let mut p50: Vec<f64> = results.iter().map(|r| r.1).collect();
        let mut p99: Vec<f64> = results.iter().map(|r| r.2).collect();
        let m = median(&mut rps);
        if i == 0 {
            http_rps = m;
        }
        println!(
            "{:<40} {:>9.0} req/s ({:>5.1} % of HTTP)  p50 {:>6.2} ms  p99 {:>6.2} ms",
            name,
            m,
            100.0 * m / http_rps,
            median(&mut p50),
            median(&mut p99)
        );
    }
    if failed_any {
        eprintln!("some answers were not 200 / OK");
        std::process::exit(1);
    }
}
