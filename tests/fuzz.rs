//! Property-based fuzzing (proptest, stable Rust) of the two parsers that
//! face the network: token verification and request-body parsing.
//!
//! Each property runs for `FUZZ_SECONDS` (default 2 s; `.ci/run` gives it
//! about a minute in all) in chunks of cases, each chunk with proptest's
//! shrinking on failure. Inputs that once broke something stay below as
//! regression cases.

use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sessiongate::domain::{DeviceId, Metadata, SessionId, UserId};
use sessiongate::http::sessions::CreateSessionBody;
use sessiongate::token::{Claims, KeyRing, TokenCodec};

const SECRET: &[u8] = b"fuzz-signing-secret-0123456789abcdef";

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    Duration::from_secs(secs)
}

/// Runs `test` on values of `strategy` until the time budget is spent.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let deadline = Instant::now() + budget();
    let mut chunks: u64 = 0;
    while Instant::now() < deadline || chunks == 0 {
        // A fresh runner per chunk: a runner runs its `cases` once, and each
        // new one draws a new random seed.
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        chunks += 1;
    }
    eprintln!("{name}: {} cases", chunks * 512);
}

fn ring() -> KeyRing {
    KeyRing::from_json(
        r#"{"active":"k1","keys":[{"kid":"k1","retire_at":0}]}"#,
        SECRET,
        Algorithm::HS256,
    )
    .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn valid_token(codec: &TokenCodec, ring: &KeyRing) -> String {
    let user = UserId::parse("fuzz-user").unwrap();
    let now = now_ms() as u64 / 1000;
    codec.sign(
        ring,
        &Claims {
            sub: "fuzz-user".into(),
            sid: SessionId::generate(&user.tag()).as_str().into(),
            did: "fuzz-device".into(),
            iss: "sessiongate".into(),
            iat: now,
            exp: now + 3600,
            nbf: None,
        },
    )
}

#[test]
fn arbitrary_strings_are_never_valid_tokens_and_never_panic() {
    let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 64);
    let ring = ring();
    let strategy = prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_=.+/-]{0,600}",
        "eyJ[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,300}\\.[A-Za-z0-9_-]{0,60}",
    ];
    fuzz("arbitrary tokens", strategy, |s| {
        prop_assert!(codec.verify(&ring, &s, now_ms()).is_err());
        Ok(())
    });
}

#[test]
fn every_mutation_of_a_valid_token_is_refused() {
    let codec = TokenCodec::with_cache(Algorithm::HS256, "sessiongate", 5, 4096, 64);
    let ring = ring();
    let token = valid_token(&codec, &ring);
    assert!(codec.verify(&ring, &token, now_ms()).is_ok());
    let len = token.len();
    let strategy = (0..len, 0u8..8, 0usize..4, any::<u8>());
    fuzz("mutated tokens", strategy, |(pos, bit, kind, byte)| {
        let mut bytes = token.clone().into_bytes();
        match kind {
            0 => bytes[pos] ^= 1 << bit,
            1 => bytes.truncate(pos),
            2 => bytes.insert(pos, byte),
            _ => {
                bytes.remove(pos);
            }
        }
        let Ok(mutated) = String::from_utf8(bytes) else {
            return Ok(());
        };
        if mutated != token {
            prop_assert!(
                codec.verify(&ring, &mutated, now_ms()).is_err(),
                "accepted a mutated token: {mutated}"
            );
        }
        Ok(())
    });
}

/// Every single-bit flip and every truncation, exhaustively.
#[test]
fn exhaustive_bit_flips_and_truncations_are_refused() {
    let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
    let ring = ring();
    let token = valid_token(&codec, &ring);
    let now = now_ms();
    for pos in 0..token.len() {
        for bit in 0..8 {
            let mut bytes = token.clone().into_bytes();
            bytes[pos] ^= 1 << bit;
            if let Ok(m) = String::from_utf8(bytes) {
                assert!(codec.verify(&ring, &m, now).is_err(), "flip {pos}/{bit}");
            }
        }
        assert!(
            codec.verify(&ring, &token[..pos], now).is_err(),
            "truncated to {pos}"
        );
    }
}

#[test]
fn create_bodies_parse_or_fail_cleanly() {
    let json_value = any::<i64>()
        .prop_map(serde_json::Value::from)
        .boxed()
        .prop_union(any::<String>().prop_map(serde_json::Value::from).boxed())
        .or(any::<bool>().prop_map(serde_json::Value::from).boxed())
        .or(Just(serde_json::Value::Null).boxed());
    let field = prop_oneof![
        Just("user_id".to_string()),
        Just("device_id".to_string()),
        Just("auth_time".to_string()),
        Just("metadata".to_string()),
        "[a-z_]{1,10}",
    ];
    let object = proptest::collection::vec((field, json_value.clone()), 0..6);
    let bodies = prop_oneof![
        object.prop_map(|pairs| {
            let map: serde_json::Map<_, _> = pairs.into_iter().collect();
            serde_json::to_vec(&map).unwrap()
        }),
        proptest::collection::vec(any::<u8>(), 0..300),
        "\\{\"user_id\":\"[^\"]{0,140}\",\"metadata\":\\{(\"[a-z]{1,3}\":\"[^\"]{0,300}\",?){0,20}\\}\\}"
            .prop_map(String::into_bytes),
    ];
    fuzz("create bodies", bodies, |raw| {
        if let Ok(body) = serde_json::from_slice::<CreateSessionBody>(&raw) {
            // The same checks the handler runs; none may panic, and what
            // passes respects the limits.
            if let Ok(user) = UserId::parse(&body.user_id) {
                prop_assert!(!user.as_str().is_empty() && user.as_str().len() <= 128);
            }
            if let Some(d) = body.device_id.as_deref() {
                let _ = DeviceId::parse(d);
            }
            if let Ok(m) = Metadata::parse(body.metadata.as_ref()) {
                prop_assert!(m.as_stored().len() <= 4096);
            }
        }
        Ok(())
    });
}

#[test]
fn session_id_parsing_never_panics() {
    fuzz("session ids", any::<String>(), |s| {
        if let Ok(sid) = SessionId::parse(&s) {
            prop_assert_eq!(sid.as_str().len(), 44);
        }
        Ok(())
    });
}

/// Inputs worth keeping: each once looked risky.
#[test]
fn regressions() {
    let codec = TokenCodec::new(Algorithm::HS256, "sessiongate", 5, 4096);
    let ring = ring();
    for token in [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "e30.e30.",
        "eyJhbGciOiJub25lIn0.e30.",
        "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.e30.AAAA",
        "\u{0}.\u{0}.\u{0}",
    ] {
        assert!(codec.verify(&ring, token, now_ms()).is_err(), "{token:?}");
    }
}
