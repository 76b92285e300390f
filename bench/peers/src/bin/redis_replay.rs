//! The yardstick's Redis client for its `redis_hget` and `redis_verify`
//! rows: CONNS connections (one thread each, plain blocking sockets), each
//! sending one pipeline at a time, N pipelines in all, so that a single
//! command and a verify's pipeline (`HGET` + `ECHO`) are measured by the
//! same client, the way redis-benchmark measures one command: one read and
//! one write per pipeline on Redis's side.
//!
//!     peer-redis-replay PORT CONNS N CMD ARG... [-- CMD ARG...]...
//!
//! Prints redis-benchmark's `--csv` layout (header line, then
//! "name","rps","avg_ms","min_ms","p50_ms","p95_ms","p99_ms","max_ms"), and
//! exits non-zero on an error reply or a broken connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn encode(cmds: &[Vec<String>]) -> Vec<u8> {
    let mut out = Vec::new();
    for cmd in cmds {
        out.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
        for arg in cmd {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Reads one RESP2 reply; Err on an error reply.
fn read_reply(r: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> Result<(), String> {
    line.clear();
    r.read_until(b'\n', line).map_err(|e| e.to_string())?;
    if line.len() < 3 {
        return Err("connection closed".into());
    }
    let n = || -> i64 {
        std::str::from_utf8(&line[1..line.len() - 2])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    };
    match line[0] {
        b'+' | b':' => Ok(()),
        b'-' => Err(String::from_utf8_lossy(line).trim().to_string()),
        b'$' => {
            let len = n();
            if len >= 0 {
                let mut skip = vec![0u8; len as usize + 2];
                r.read_exact(&mut skip).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        b'*' => {
            let count = n();
            let mut inner = Vec::new();
            for _ in 0..count.max(0) {
                read_reply(r, &mut inner)?;
            }
            Ok(())
        }
        other => Err(format!("unexpected reply type {:?}", other as char)),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: peer-redis-replay PORT CONNS N CMD ARG... [-- CMD ARG...]...");
        std::process::exit(2);
    }
    let port: u16 = args[0].parse().expect("PORT");
    let conns: u64 = args[1].parse().expect("CONNS");
    let total: u64 = args[2].parse().expect("N");
    let cmds: Vec<Vec<String>> = args[3..]
        .split(|a| a == "--")
        .filter(|c| !c.is_empty())
        .map(|c| c.to_vec())
        .collect();
    let packet = Arc::new(encode(&cmds));
    let replies = cmds.len();
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let started = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (packet, next, latencies) = (packet.clone(), next.clone(), latencies.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let t = Instant::now();
                    writer.write_all(&packet).map_err(|e| e.to_string())?;
                    for _ in 0..replies {
                        read_reply(&mut reader, &mut line)?;
                    }
                    mine.push(t.elapsed().as_micros() as u64);
                }
                latencies.lock().unwrap().extend(mine);
                Ok(())
            })
        })
        .collect();
    for t in threads {
        if let Err(e) = t.join().expect("a client thread panicked") {
            eprintln!("peer-redis-replay: {e}");
            std::process::exit(1);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let pct = |p: f64| ms(l[((l.len() as f64 * p) as usize).min(l.len() - 1)]);
    let avg = l.iter().sum::<u64>() as f64 / l.len() as f64 / 1000.0;
    let name: Vec<&str> = cmds.iter().map(|c| c[0].as_str()).collect();
    println!("\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"");
    println!(
        "\"{}\",\"{:.2}\",\"{:.3}\",\"{:.3}\",\"{:.3}\",\"{:.3}\",\"{:.3}\",\"{:.3}\"",
        name.join("+"),
        l.len() as f64 / secs,
        avg,
        ms(l[0]),
        pct(0.50),
        pct(0.95),
        pct(0.99),
        ms(l[l.len() - 1])
    );
}
