//! Token attacks: every forged, tampered, truncated or malformed token is
//! refused with 401 `invalid_token` in-process, without a single Redis call;
//! a valid token costs exactly one read (HGET + ECHO).
//!
//! Tokens are crafted by hand (base64url + HMAC-SHA256). Because the signing
//! key derives from the signing secret and the `kid` (HKDF-SHA256, see
//! `src/token.rs`), and the tests know the secret, they can also forge
//! *correctly signed* tokens whose claims are wrong: those prove the claim
//! checks themselves, not just the signature check.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::helpers::{Created, SIGNING_SECRET, TestApp, assert_error, spawn_app, spawn_app_with};

// --- crafting tokens ---------------------------------------------------------

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(part: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(part)
        .expect("a part of a real token")
}

/// The three parts of a compact token.
fn parts(token: &str) -> (&str, &str, &str) {
    let mut it = token.split('.');
    let parts = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    assert!(it.next().is_none(), "a real token has three parts");
    parts
}

fn header_of(token: &str) -> Map<String, Value> {
    serde_json::from_slice(&unb64(parts(token).0)).unwrap()
}

fn claims_of(token: &str) -> Map<String, Value> {
    serde_json::from_slice(&unb64(parts(token).1)).unwrap()
}

fn kid_of(token: &str) -> String {
    header_of(token)["kid"].as_str().unwrap().to_string()
}

/// The HS256 key the service derives for `kid` (src/token.rs `derive_key`).
fn derived_key(kid: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"sessiongate/v1"), SIGNING_SECRET.as_bytes())
        .expand(format!("jwt-signing-key:{kid}").as_bytes(), &mut out)
        .unwrap();
    out
}

fn hmac256(key: &[u8], msg: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hmac384(key: &[u8], msg: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha384>::new_from_slice(key).unwrap();
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hmac512(key: &[u8], msg: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha512>::new_from_slice(key).unwrap();
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// `b64(header).b64(payload).HS256(key of kid)`, from raw JSON texts (so a
/// test can write duplicate keys, non-JSON, anything).
fn sign_raw(header_text: &str, payload_text: &str, kid: &str) -> String {
    let msg = format!("{}.{}", b64(header_text), b64(payload_text));
    let sig = b64(hmac256(&derived_key(kid), &msg));
    format!("{msg}.{sig}")
}

fn sign(header: &Map<String, Value>, claims: &Map<String, Value>, kid: &str) -> String {
    sign_raw(
        &Value::Object(header.clone()).to_string(),
        &Value::Object(claims.clone()).to_string(),
        kid,
    )
}

/// A correctly signed copy of `real` (same kid, same key) after `edit`
/// changed its header and claims.
fn forge(
    real: &str,
    edit: impl FnOnce(&mut Map<String, Value>, &mut Map<String, Value>),
) -> String {
    let (mut header, mut claims) = (header_of(real), claims_of(real));
    edit(&mut header, &mut claims);
    sign(&header, &claims, &kid_of(real))
}

/// `real` with only its claims changed, correctly signed.
fn forge_claims(real: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    forge(real, |_, c| edit(c))
}

/// `real` with only its header changed, correctly signed.
fn forge_header(real: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    forge(real, |h, _| edit(h))
}

/// A well-formed session id for `user` (its tag, then 128 random bits) that
/// no create ever returned.
fn fresh_session_id(user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    format!(
        "{}{}",
        b64(&digest[..16]),
        b64(uuid::Uuid::new_v4().as_bytes())
    )
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Flips bit `bit` (0..6) of the base64url character at `index` of `token`:
/// the character becomes another base64url character.
fn flip_char(token: &str, index: usize, bit: u32) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = token.as_bytes().to_vec();
    let pos = ALPHABET.iter().position(|&c| c == bytes[index]).unwrap();
    bytes[index] = ALPHABET[pos ^ (1 << bit)];
    String::from_utf8(bytes).unwrap()
}

// --- asserting refusals --------------------------------------------------------

/// Commands the service sends on its own, whatever the requests: the events
/// subscription, pool health checks, connection set-up, and the test's own
/// `INFO`. The global state refresher's read (every 250 ms) is one
/// `EVALSHA` of read.lua, the only script that runs `HMGET`.
fn is_background(command: &str) -> bool {
    matches!(
        command,
        "hmget" | "info" | "ping" | "subscribe" | "psubscribe" | "hello" | "select"
    ) || command.starts_with("client")
}

/// Calls per command, background commands left out: as many `EVALSHA`s
/// (and `TIME`s) as there were `HMGET`s are the refresher's reads, the rest
/// are requests'.
fn data_commands(app: &TestApp) -> HashMap<String, u64> {
    let all = app.command_counts();
    let reads = all.get("hmget").copied().unwrap_or(0);
    let mut data: HashMap<String, u64> = all
        .into_iter()
        .filter(|(name, _)| !is_background(name))
        .collect();
    // read.lua also reads Redis's clock (one TIME each).
    for name in ["evalsha", "time"] {
        if let Some(n) = data.get_mut(name) {
            *n -= reads;
        }
    }
    data.retain(|_, n| *n > 0);
    data
}

fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// At most 160 characters of a token, for failure messages.
fn short(token: &str) -> String {
    match token.char_indices().nth(160) {
        Some((at, _)) => format!("{}… ({} bytes)", &token[..at], token.len()),
        None => token.to_string(),
    }
}

/// `GET /v1/verify` with `Authorization: Bearer <token>`; a dropped
/// connection (e.g. the handler panicked) fails with a readable message.
async fn send_verify(app: &TestApp, token: &str, what: &str) -> Response {
    app.request(Method::GET, "/v1/verify")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("{what}: no HTTP answer to verify (did the service crash?): {e}")
        })
}

/// The token is refused with 401 `invalid_token` and the exact
/// `WWW-Authenticate` of the contract, and no Redis command but the
/// background ones ran meanwhile (so no `EVALSHA`/`EVAL`, and no `HGET`
/// either, which would show up even from inside a script).
async fn assert_refused_without_redis(app: &TestApp, token: &str, what: &str) {
    let before = data_commands(app);
    let res = send_verify(app, token, what).await;
    let after = data_commands(app);
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "{what}: status for token {:?}",
        short(token)
    );
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some(r#"Bearer error="invalid_token""#),
        "{what}: WWW-Authenticate"
    );
    let body = assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
    assert!(
        !body.to_string().contains(token) || token.len() < 8,
        "{what}: the error body echoes the token"
    );
    assert_eq!(
        before, after,
        "{what}: Redis commands ran for a token that must be refused in-process"
    );
}

async fn assert_all_refused(app: &TestApp, cases: &[(String, String)]) {
    for (what, token) in cases {
        assert_refused_without_redis(app, token, what).await;
    }
}

/// A session, asserting first that its token verifies.
async fn live_session(app: &TestApp, user: &str, device: &str) -> Created {
    let s = app.create(user, device).await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
    s
}

// --- the forging helper is right -------------------------------------------------

#[tokio::test]
async fn forging_helper_reproduces_real_tokens_and_forged_twins_verify() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let (h, p, _) = parts(&s.token);

    // Signing the real header and payload texts gives the real token, byte
    // for byte: the helper derives the same key as the service.
    let header_text = String::from_utf8(unb64(h)).unwrap();
    let payload_text = String::from_utf8(unb64(p)).unwrap();
    assert_eq!(
        sign_raw(&header_text, &payload_text, &kid_of(&s.token)),
        s.token
    );

    // A re-serialised twin (other key order) with equal claims verifies.
    let twin = forge(&s.token, |_, _| {});
    assert_ne!(twin, s.token);
    let res = send_verify(&app, &twin, "twin").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-session-id"], s.session_id.as_str());
    assert_eq!(res.headers()["x-session-user"], "alice");

    // The claims are the contract's.
    let claims = claims_of(&s.token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["sid"], s.session_id.as_str());
    assert_eq!(claims["did"], "laptop");
    assert_eq!(claims["iss"], "sessiongate");
    assert_eq!(claims["exp"], s.body["expires_at"]);
    assert_eq!(claims["iat"], s.body["created_at"]);
    let header = header_of(&s.token);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(header["typ"], "JWT");
}

// --- algorithms -------------------------------------------------------------------

#[tokio::test]
async fn any_algorithm_but_hs256_is_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let kid = kid_of(&s.token);
    let key = derived_key(&kid);
    let (_, payload, real_sig) = parts(&s.token);

    let mut cases = Vec::new();
    for alg in [
        "none",
        "None",
        "NONE",
        "nOnE",
        "hs256",
        "Hs256",
        "HS256 ",
        " HS256",
        "HS256\u{0}",
        "HS384",
        "HS512",
        "RS256",
        "ES256",
        "PS256",
        "EdDSA",
        "",
    ] {
        let mut header = header_of(&s.token);
        header.insert("alg".into(), json!(alg));
        let h = b64(Value::Object(header).to_string());
        let msg = format!("{h}.{payload}");
        cases.push((
            format!("alg {alg:?}, real signature kept"),
            format!("{msg}.{real_sig}"),
        ));
        cases.push((format!("alg {alg:?}, empty signature"), format!("{msg}.")));
        // The signature this alg name would ask for, made with the real key.
        let sig = match alg {
            "HS384" => b64(hmac384(&key, &msg)),
            "HS512" => b64(hmac512(&key, &msg)),
            _ => b64(hmac256(&key, &msg)),
        };
        cases.push((
            format!("alg {alg:?}, signed with the real key"),
            format!("{msg}.{sig}"),
        ));
    }
    // alg missing, null, or of another type.
    for alg in [
        Value::Null,
        json!(["HS256"]),
        json!({"HS256": true}),
        json!(256),
    ] {
        let t = forge_header(&s.token, |h| {
            h.insert("alg".into(), alg.clone());
        });
        cases.push((format!("alg {alg}"), t));
    }
    let t = forge_header(&s.token, |h| {
        h.remove("alg");
    });
    cases.push(("alg missing".into(), t));

    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

// --- tampering ----------------------------------------------------------------------

#[tokio::test]
async fn tampered_header_payload_or_signature_is_refused_without_redis() {
    let app = spawn_app().await;
    let alice = live_session(&app, "alice", "laptop").await;
    let bob = live_session(&app, "bob", "phone").await;
    let (h, p, sig) = parts(&alice.token);
    let (_, bob_p, bob_sig) = parts(&bob.token);

    let reencode = |edit: &dyn Fn(&mut Map<String, Value>)| {
        let mut claims = claims_of(&alice.token);
        edit(&mut claims);
        b64(Value::Object(claims).to_string())
    };
    let as_bob = reencode(&|c| {
        c.insert("sub".into(), json!("bob"));
    });
    let bobs_sid = reencode(&|c| {
        c.insert("sid".into(), json!(bob.session_id));
        c.insert("sub".into(), json!("bob"));
    });
    let later = reencode(&|c| {
        let exp = c["exp"].as_i64().unwrap();
        c.insert("exp".into(), json!(exp + 86_400));
    });
    let reordered_header = b64(format!(
        r#"{{"kid":"{}","alg":"HS256","typ":"JWT"}}"#,
        kid_of(&alice.token)
    ));

    let cases = vec![
        (
            "payload: sub changed to bob".to_string(),
            format!("{h}.{as_bob}.{sig}"),
        ),
        (
            "payload: sid and sub of bob".into(),
            format!("{h}.{bobs_sid}.{sig}"),
        ),
        (
            "payload: exp one day later".into(),
            format!("{h}.{later}.{sig}"),
        ),
        (
            "payload: bob's payload".into(),
            format!("{h}.{bob_p}.{sig}"),
        ),
        (
            "header: same members reordered".into(),
            format!("{reordered_header}.{p}.{sig}"),
        ),
        ("signature: bob's".into(), format!("{h}.{p}.{bob_sig}")),
        (
            "signature: all A".into(),
            format!("{h}.{p}.{}", "A".repeat(sig.len())),
        ),
        (
            "signature: reversed".into(),
            format!("{h}.{p}.{}", sig.chars().rev().collect::<String>()),
        ),
        (
            "signature: of the empty message".into(),
            format!(
                "{h}.{p}.{}",
                b64(hmac256(&derived_key(&kid_of(&alice.token)), ""))
            ),
        ),
        (
            "signature: 31 of 32 bytes".into(),
            format!("{h}.{p}.{}", b64(&unb64(sig)[..31])),
        ),
        (
            "signature: 33 bytes".into(),
            format!("{h}.{p}.{}", b64([unb64(sig), vec![0]].concat())),
        ),
        ("signature: doubled".into(), format!("{h}.{p}.{sig}{sig}")),
    ];
    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(&alice.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
}

#[tokio::test]
async fn every_bit_flip_of_the_signature_and_of_payload_chars_is_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let (h, p, sig) = parts(&s.token);
    let sig_start = h.len() + 1 + p.len() + 1;
    let mut cases = Vec::new();

    // Every bit of the 32 signature bytes.
    let raw = unb64(sig);
    assert_eq!(raw.len(), 32);
    for byte in 0..raw.len() {
        for bit in 0..8 {
            let mut flipped = raw.clone();
            flipped[byte] ^= 1 << bit;
            cases.push((
                format!("signature byte {byte} bit {bit}"),
                format!("{h}.{p}.{}", b64(&flipped)),
            ));
        }
    }
    // Every bit of every signature character; in the last one, the low bits
    // are padding, so their flips are non-canonical encodings of the very
    // same signature bytes and must be refused too.
    for index in sig_start..s.token.len() {
        for bit in 0..6 {
            cases.push((
                format!("signature char {} bit {bit}", index - sig_start),
                flip_char(&s.token, index, bit),
            ));
        }
    }
    // Every bit of a few payload characters (first, last, and some between).
    let payload_start = h.len() + 1;
    for offset in [0, 1, 7, 20, p.len() / 2, p.len() - 2, p.len() - 1] {
        for bit in 0..6 {
            cases.push((
                format!("payload char {offset} bit {bit}"),
                flip_char(&s.token, payload_start + offset, bit),
            ));
        }
    }
    // And of a few header characters.
    for offset in [0, 5, h.len() - 1] {
        for bit in 0..6 {
            cases.push((
                format!("header char {offset} bit {bit}"),
                flip_char(&s.token, offset, bit),
            ));
        }
    }
    assert!(cases.len() > 500);
    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn every_truncation_of_a_token_is_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let token = &s.token;
    let (h, p, _) = parts(token);
    let mut lengths: Vec<usize> = (0..token.len()).step_by(7).collect();
    // Around each dot, and the last characters.
    for at in [h.len(), h.len() + 1 + p.len()] {
        lengths.extend([at - 1, at, at + 1]);
    }
    lengths.extend((token.len() - 4)..token.len());
    lengths.sort();
    lengths.dedup();
    let mut cases: Vec<(String, String)> = lengths
        .iter()
        .map(|&n| {
            (
                format!("first {n} of {} chars", token.len()),
                token[..n].to_string(),
            )
        })
        .collect();
    // Cut from the front too.
    for n in (1..token.len()).step_by(29) {
        cases.push((
            format!("without the first {n} chars"),
            token[n..].to_string(),
        ));
    }
    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(token).await, StatusCode::OK);
}

// --- key ids and header members ------------------------------------------------------

#[tokio::test]
async fn hostile_or_unknown_kids_are_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let real_kid = kid_of(&s.token);

    let hostile = [
        "AAAAAAAAAAAAAAAA".to_string(),
        String::new(),
        "../../etc/passwd".into(),
        "..%2F..%2Fetc%2Fpasswd".into(),
        "kid\r\nX-Injected: 1".into(),
        "\r\n".into(),
        "*1\r\n$8\r\nFLUSHALL\r\n".into(),
        "x".repeat(1024),
        format!("{real_kid} "),
        format!(" {real_kid}"),
        format!("{real_kid}\u{0}"),
        real_kid.to_uppercase(),
        real_kid.to_lowercase(),
        format!("{real_kid}{real_kid}"),
        real_kid[..real_kid.len() - 1].to_string(),
        "sg:global".into(),
        "*".into(),
    ];
    let mut cases = Vec::new();
    for kid in &hostile {
        if kid == &real_kid {
            continue;
        }
        let mut header = header_of(&s.token);
        header.insert("kid".into(), json!(kid));
        let claims = claims_of(&s.token);
        // Signed with the key derived for that very kid (a key the service
        // could compute), and with the real key: neither may pass.
        cases.push((
            format!("kid {kid:?}, own derived key"),
            sign(&header, &claims, kid),
        ));
        cases.push((
            format!("kid {kid:?}, real key"),
            sign(&header, &claims, &real_kid),
        ));
    }
    for kid in [
        Value::Null,
        json!(1),
        json!([real_kid]),
        json!({"kid": real_kid}),
    ] {
        let t = forge_header(&s.token, |h| {
            h.insert("kid".into(), kid.clone());
        });
        cases.push((format!("kid {kid}"), t));
    }
    let t = forge_header(&s.token, |h| {
        h.remove("kid");
    });
    cases.push(("kid missing".into(), t));

    assert_all_refused(&app, &cases).await;
    // Nothing was injected into Redis: the session is still there.
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn header_members_beyond_alg_typ_kid_are_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let kid = kid_of(&s.token);
    let (_, p, _) = parts(&s.token);
    let payload_text = String::from_utf8(unb64(p)).unwrap();

    let extra: Vec<(&str, Value)> = vec![
        ("jku", json!("https://attacker.example/jwks.json")),
        ("jwk", json!({"kty": "oct", "k": b64(derived_key(&kid))})),
        ("x5u", json!("https://attacker.example/cert.pem")),
        ("x5c", json!(["MIIB"])),
        ("x5t", json!("abc")),
        ("crit", json!(["exp"])),
        ("cty", json!("JWT")),
        ("b64", json!(false)),
        ("zip", json!("DEF")),
        ("enc", json!("A256GCM")),
        ("nonce", json!("1")),
    ];
    let mut cases = Vec::new();
    for (name, value) in extra {
        // Correctly signed: the only thing wrong is the extra member.
        let t = forge_header(&s.token, |h| {
            h.insert(name.into(), value.clone());
        });
        cases.push((format!("header with {name}"), t));
    }
    for typ in [
        "JWE",
        "JWS",
        "JOSE",
        "at+jwt",
        "",
        "JWT ",
        "application/jwt",
    ] {
        let t = forge_header(&s.token, |h| {
            h.insert("typ".into(), json!(typ));
        });
        cases.push((format!("typ {typ:?}"), t));
    }
    // Duplicate members, correctly signed.
    let duplicates = [
        format!(r#"{{"alg":"HS256","alg":"none","kid":"{kid}","typ":"JWT"}}"#),
        format!(r#"{{"alg":"none","alg":"HS256","kid":"{kid}","typ":"JWT"}}"#),
        format!(r#"{{"alg":"HS256","kid":"other","kid":"{kid}","typ":"JWT"}}"#),
        format!(r#"{{"alg":"HS256","kid":"{kid}","kid":"{kid}","typ":"JWT"}}"#),
        format!(r#"{{"alg":"HS256","kid":"{kid}","typ":"JWT","typ":"JWT"}}"#),
    ];
    for text in &duplicates {
        cases.push((
            format!("header {text}"),
            sign_raw(text, &payload_text, &kid),
        ));
    }
    // Headers that are not a JSON object, correctly signed.
    let not_objects = [
        "hello".to_string(),
        String::new(),
        "null".into(),
        "[]".into(),
        format!(r#"["HS256","{kid}"]"#),
        "{".into(),
        format!(r#"{{"alg":"HS256","kid":"{kid}"}}garbage"#),
        format!("\u{feff}{{\"alg\":\"HS256\",\"kid\":\"{kid}\"}}"),
        format!(r#"{{'alg':'HS256','kid':'{kid}'}}"#),
    ];
    for text in &not_objects {
        cases.push((
            format!("header text {text:?}"),
            sign_raw(text, &payload_text, &kid),
        ));
    }
    // The same header with only alg and kid is fine (typ is optional).
    let minimal = sign_raw(
        &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
        &payload_text,
        &kid,
    );
    assert_eq!(
        send_verify(&app, &minimal, "minimal header").await.status(),
        StatusCode::OK
    );

    assert_all_refused(&app, &cases).await;
}

// --- shapes ---------------------------------------------------------------------

#[tokio::test]
async fn malformed_token_shapes_are_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let t = &s.token;
    let (h, p, sig) = parts(t);
    // With `=` padding (one more `=` when the part needs none).
    let padded = |part: &str| {
        let with = URL_SAFE.encode(unb64(part));
        if with == part {
            format!("{part}=")
        } else {
            with
        }
    };
    // The real signature in the standard alphabet (`+` and `/`), forced to
    // differ from the URL-safe one.
    let standard = {
        let std = STANDARD_NO_PAD.encode(unb64(sig));
        if std == sig {
            format!("+{}", &std[1..])
        } else {
            std
        }
    };
    let jws_json = json!({"protected": h, "payload": p, "signature": sig}).to_string();
    let jws_general =
        json!({"payload": p, "signatures": [{"protected": h, "signature": sig}]}).to_string();

    let cases: Vec<(String, String)> = vec![
        ("empty".into(), String::new()),
        ("a dot".into(), ".".into()),
        ("two dots".into(), "..".into()),
        ("four dots".into(), "....".into()),
        ("one part".into(), h.to_string()),
        ("two parts".into(), format!("{h}.{p}")),
        ("two parts, trailing dot".into(), format!("{h}.{p}.")),
        ("four parts".into(), format!("{t}.{sig}")),
        (
            "JWE-like five parts".into(),
            format!("{h}.{p}.{sig}.{p}.{sig}"),
        ),
        ("five parts, empty ones".into(), format!("{h}...{sig}.")),
        ("leading dot".into(), format!(".{t}")),
        ("trailing dot".into(), format!("{t}.")),
        ("JWS JSON serialization".into(), jws_json),
        ("JWS JSON general serialization".into(), jws_general),
        (
            "padding on the header".into(),
            format!("{}.{p}.{sig}", padded(h)),
        ),
        (
            "padding on the payload".into(),
            format!("{h}.{}.{sig}", padded(p)),
        ),
        (
            "padding on the signature".into(),
            format!("{h}.{p}.{}", padded(sig)),
        ),
        ("an extra = at the end".into(), format!("{t}=")),
        ("an extra == at the end".into(), format!("{t}==")),
        (
            "standard base64 signature".into(),
            format!("{h}.{p}.{standard}"),
        ),
        ("+ in the header".into(), format!("+{}", &t[1..])),
        ("/ in the payload".into(), format!("{h}./{}.{sig}", &p[1..])),
        (
            "* in the signature".into(),
            format!("{h}.{p}.*{}", &sig[1..]),
        ),
        (
            "% in the signature".into(),
            format!("{h}.{p}.%{}", &sig[1..]),
        ),
        (
            "! in the header".into(),
            format!("{}!.{p}.{sig}", &h[..h.len() - 1]),
        ),
        ("space inside".into(), format!("{h}.{p} .{sig}")),
        ("tab inside".into(), format!("{h}.\t{p}.{sig}")),
        ("a second Bearer".into(), format!("Bearer {t}")),
        ("two tokens".into(), format!("{t} {t}")),
        ("two tokens, comma".into(), format!("{t},{t}")),
        ("non-ASCII".into(), format!("{h}.{p}.{sig}é")),
        ("garbage over the size cap".into(), "A".repeat(5000)),
        (
            "dots over the size cap".into(),
            format!(
                "{}.{}.{}",
                "A".repeat(2000),
                "B".repeat(2000),
                "C".repeat(200)
            ),
        ),
    ];
    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(t).await, StatusCode::OK);
}

#[tokio::test]
async fn the_size_cap_refuses_a_correctly_signed_token_one_byte_over_4096() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let padded = |n: usize| {
        forge_claims(&s.token, |c| {
            c.insert("pad".into(), json!("x".repeat(n)));
        })
    };
    // The longest padding that fits in 4096 bytes, and the next one up. The
    // length only grows with the padding, so a binary search finds it in a
    // dozen signatures (not thousands: the test thread stays light).
    let (mut fits, mut too_long) = (0, 4096);
    assert!(padded(fits).len() <= 4096 && padded(too_long).len() > 4096);
    while too_long - fits > 1 {
        let mid = (fits + too_long) / 2;
        if padded(mid).len() <= 4096 {
            fits = mid;
        } else {
            too_long = mid;
        }
    }
    let at_cap = padded(fits);
    let over = (fits + 1..fits + 8)
        .map(padded)
        .find(|t| t.len() > 4096)
        .unwrap();
    assert!(
        at_cap.len() <= 4096 && over.len() <= 4100,
        "{} {}",
        at_cap.len(),
        over.len()
    );

    // Control: at the cap, an unknown extra claim is tolerated, so the size
    // alone is what refuses the next one.
    assert_eq!(
        send_verify(&app, &at_cap, "at the cap").await.status(),
        StatusCode::OK,
        "a correctly signed token of {} bytes",
        at_cap.len()
    );
    assert_refused_without_redis(&app, &over, &format!("{} bytes", over.len())).await;
    // Far over the cap, but within what the HTTP layer reads (a head of
    // several tens of KB may be answered 431 before the service sees it).
    assert_refused_without_redis(&app, &padded(4500), "6 KB token").await;
}

// --- correctly signed tokens with wrong claims ---------------------------------------

#[tokio::test]
async fn correctly_signed_tokens_with_bad_times_are_refused_without_redis() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    let now = now_s();
    let edits: Vec<(&str, &str, Value)> = vec![
        ("exp", "an hour ago", json!(now - 3600)),
        ("exp", "10 s ago (past the 5 s leeway)", json!(now - 10)),
        ("exp", "zero", json!(0)),
        ("exp", "a string", json!((now + 3600).to_string())),
        ("exp", "a float", json!(now as f64 + 3600.5)),
        ("exp", "a whole float", json!(now as f64 + 3600.0)),
        ("exp", "negative", json!(-1)),
        ("exp", "1e30", json!(1e30)),
        ("exp", "null", Value::Null),
        ("exp", "true", json!(true)),
        ("exp", "an array", json!([now + 3600])),
        ("nbf", "in a minute", json!(now + 60)),
        ("nbf", "in 10 s (past the leeway)", json!(now + 10)),
        ("nbf", "a string", json!(now.to_string())),
        ("nbf", "a float", json!(now as f64 - 0.5)),
        ("nbf", "negative", json!(-1)),
        ("nbf", "1e30", json!(1e30)),
        ("iat", "in a minute", json!(now + 60)),
        ("iat", "in 10 s (past the leeway)", json!(now + 10)),
        ("iat", "a string", json!(now.to_string())),
        ("iat", "a float", json!(now as f64 + 0.5)),
        ("iat", "negative", json!(-1)),
        ("iat", "1e30", json!(1e30)),
        ("iat", "u64 max", json!(u64::MAX)),
        ("iat", "null", Value::Null),
    ];
    let mut cases = Vec::new();
    for (claim, label, value) in edits {
        let t = forge_claims(&s.token, |c| {
            c.insert(claim.into(), value.clone());
        });
        cases.push((format!("{claim} {label} ({value})"), t));
    }
    assert_all_refused(&app, &cases).await;

    // Controls: inside the leeway, and a past nbf, are accepted.
    let within = forge_claims(&s.token, |c| {
        c.insert("iat".into(), json!(now + 2));
        c.insert("nbf".into(), json!(now - 60));
    });
    assert_eq!(
        send_verify(&app, &within, "iat 2 s ahead").await.status(),
        StatusCode::OK
    );
}

/// `exp` near `u64::MAX` passes jsonwebtoken's own check (it is far in the
/// future), then reaches `claims.exp + self.leeway_s` in src/token.rs.
#[tokio::test]
async fn an_exp_at_the_u64_limit_is_refused_without_crashing() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await;
    for exp in [u64::MAX, u64::MAX - 1, u64::MAX - 4] {
        let t = forge_claims(&s.token, |c| {
            c.insert("exp".into(), json!(exp));
        });
        // Refused either way (the session has its own absolute expiry), but
        // never by dropping the connection.
        let res = send_verify(&app, &t, &format!("exp {exp}")).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "exp {exp}");
    }
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

#[tokio::test]
async fn correctly_signed_tokens_with_bad_claims_are_refused_without_redis() {
    let app = spawn_app().await;
    let alice = live_session(&app, "alice", "laptop").await;
    let bob = live_session(&app, "bob", "phone").await;
    let t = &alice.token;
    let mut cases = Vec::new();

    for claim in ["sub", "sid", "did", "iss", "exp", "iat"] {
        let forged = forge_claims(t, |c| {
            c.remove(claim);
        });
        cases.push((format!("{claim} missing"), forged));
    }
    let set = |pairs: Vec<(&str, Value)>| {
        forge_claims(t, |c| {
            for (k, v) in pairs {
                c.insert(k.into(), v);
            }
        })
    };
    let cr_lf_user = "ali\r\nce";
    let nul_user = "alice\u{0}";
    let edits: Vec<(&str, Vec<(&str, Value)>)> = vec![
        ("iss evil", vec![("iss", json!("evil"))]),
        ("iss empty", vec![("iss", json!(""))]),
        ("iss other case", vec![("iss", json!("SessionGate"))]),
        (
            "iss with a trailing space",
            vec![("iss", json!("sessiongate "))],
        ),
        ("iss as an array", vec![("iss", json!(["sessiongate"]))]),
        ("iss null", vec![("iss", Value::Null)]),
        // sub and sid must belong together (the sid carries its user's tag).
        ("sub bob, alice's sid", vec![("sub", json!("bob"))]),
        ("sub alice, bob's sid", vec![("sid", json!(bob.session_id))]),
        ("sub mallory, alice's sid", vec![("sub", json!("mallory"))]),
        ("sub ALICE", vec![("sub", json!("ALICE"))]),
        ("sub empty", vec![("sub", json!(""))]),
        ("sub a number", vec![("sub", json!(42))]),
        ("sub an array", vec![("sub", json!(["alice"]))]),
        // Control characters, with a sid of that very user (right tag), so
        // only the id check can refuse.
        (
            "sub with CR/LF, matching sid",
            vec![
                ("sub", json!(cr_lf_user)),
                ("sid", json!(fresh_session_id(cr_lf_user))),
            ],
        ),
        (
            "sub with NUL, matching sid",
            vec![
                ("sub", json!(nul_user)),
                ("sid", json!(fresh_session_id(nul_user))),
            ],
        ),
        (
            "sub of 129 bytes, matching sid",
            vec![
                ("sub", json!("a".repeat(129))),
                ("sid", json!(fresh_session_id(&"a".repeat(129)))),
            ],
        ),
        ("did with CR/LF", vec![("did", json!("lap\r\ntop"))]),
        ("did with NUL", vec![("did", json!("lap\u{0}top"))]),
        ("did with NEL", vec![("did", json!("lap\u{85}top"))]),
        ("did empty", vec![("did", json!(""))]),
        ("did of 129 bytes", vec![("did", json!("d".repeat(129)))]),
        ("did a number", vec![("did", json!(7))]),
        (
            "sid path traversal",
            vec![("sid", json!("../../etc/passwd"))],
        ),
        ("sid empty", vec![("sid", json!(""))]),
        (
            "sid one char longer",
            vec![("sid", json!(format!("{}A", alice.session_id)))],
        ),
        (
            "sid one char shorter",
            vec![("sid", json!(&alice.session_id[..43]))],
        ),
        (
            "sid with a star",
            vec![("sid", json!(format!("{}*", &alice.session_id[..43])))],
        ),
        (
            "sid with CR/LF",
            vec![("sid", json!(format!("{}\r\n", &alice.session_id[..42])))],
        ),
        ("sid a number", vec![("sid", json!(1))]),
    ];
    for (what, pairs) in edits {
        cases.push((what.to_string(), set(pairs)));
    }
    // Payloads that are not a claims object, and duplicate claims.
    let kid = kid_of(t);
    let payload_text = String::from_utf8(unb64(parts(t).1)).unwrap();
    let dup_sub = payload_text.replacen('{', r#"{"sub":"bob","#, 1);
    let dup_sid = payload_text.replacen('{', &format!(r#"{{"sid":"{}","#, bob.session_id), 1);
    for (what, text) in [
        ("payload: duplicate sub", dup_sub),
        ("payload: duplicate sid", dup_sid),
        ("payload: an array", format!("[{payload_text}]")),
        ("payload: null", "null".into()),
        ("payload: a string", "\"alice\"".into()),
        ("payload: empty", String::new()),
        ("payload: trailing garbage", format!("{payload_text}x")),
    ] {
        let header_text = String::from_utf8(unb64(parts(t).0)).unwrap();
        cases.push((what.to_string(), sign_raw(&header_text, &text, &kid)));
    }

    assert_all_refused(&app, &cases).await;
    assert_eq!(app.verify_status(&alice.token).await, StatusCode::OK);
    assert_eq!(app.verify_status(&bob.token).await, StatusCode::OK);
}

// --- what a valid-looking token costs -------------------------------------------------

#[tokio::test]
async fn a_correctly_signed_token_for_an_unknown_session_costs_one_read() {
    let app = spawn_app().await;
    let s = live_session(&app, "alice", "laptop").await; // also loads the script
    let ghosts = [
        // Same user (whose hash exists), a session id nobody was given.
        forge_claims(&s.token, |c| {
            c.insert("sid".into(), json!(fresh_session_id("alice")));
        }),
        // A user Redis has never heard of.
        forge_claims(&s.token, |c| {
            c.insert("sub".into(), json!("nobody"));
            c.insert("sid".into(), json!(fresh_session_id("nobody")));
        }),
        // Alice's real session, but another device.
        forge_claims(&s.token, |c| {
            c.insert("did".into(), json!("phone"));
        }),
    ];
    for (i, ghost) in ghosts.iter().enumerate() {
        let before = app.command_counts();
        let res = send_verify(&app, ghost, "ghost").await;
        let after = app.command_counts();
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
        assert_eq!(delta(&before, &after, "hget"), 1, "ghost {i}: HGET calls");
        assert_eq!(delta(&before, &after, "echo"), 1, "ghost {i}: ECHO calls");
        assert_eq!(
            delta(&before, &after, "evalsha"),
            0,
            "ghost {i}: EVALSHA calls"
        );
        assert_eq!(delta(&before, &after, "eval"), 0, "ghost {i}: EVAL calls");
        assert_eq!(
            delta(&before, &after, "script|load"),
            0,
            "ghost {i}: SCRIPT LOAD"
        );
    }
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}

/// A service whose global state refresher is paused: it re-reads every hour
/// (the state stays fresh for three), so after its reads at start-up it
/// runs again only when woken by an events message, and nothing publishes
/// one unless the test changes the global state.
pub async fn spawn_app_with_refresher_paused() -> TestApp {
    spawn_app_with(&[
        ("STATE_REFRESH_INTERVAL", "1h"),
        ("STATE_MAX_STALENESS", "3h"),
    ])
    .await
}

/// Every command Redis counted (`INFO commandstats`) while `work` ran,
/// nothing left out (but commands that did not rise), in a window where the
/// refresher did not run: read.lua's `HMGET` is its only use of that
/// command, so a window where `HMGET` rose (the refresher's wake-up read
/// after subscribing at start) is run again, up to 5 times.
pub async fn every_command_during<F, Fut>(app: &TestApp, mut work: F) -> HashMap<String, u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..5 {
        let before = app.command_counts();
        work().await;
        let after = app.command_counts();
        let rose: HashMap<String, u64> = after
            .keys()
            .map(|name| (name.clone(), delta(&before, &after, name)))
            .filter(|(_, d)| *d > 0)
            .collect();
        if !rose.contains_key("hmget") {
            return rose;
        }
    }
    panic!("the refresher ran in every window: is it paused?");
}

/// The hot path is one round trip and no script: a plain `HGET` of the
/// record pipelined with the `ECHO` of the call's nonce, per verify.
///
/// Every command Redis sees during N verifies is counted, with the
/// refresher paused and nothing excluded: exactly N `HGET`s and N `ECHO`s
/// (no touch is due, so no `EVALSHA`), plus the test's own `INFO` that took
/// the "before" numbers. No `PING`, `SELECT`, `CLIENT`, `HELLO`, `HMGET`,
/// `TIME`, no second `HGET`, no `SCRIPT LOAD`.
#[tokio::test]
async fn a_valid_token_costs_exactly_one_read_per_verify() {
    const N: u64 = 20;
    let app = spawn_app_with_refresher_paused().await;
    let s = live_session(&app, "alice", "laptop").await; // loads the script
    let expected: HashMap<String, u64> = [("hget", N), ("echo", N), ("info", 1)]
        .into_iter()
        .map(|(name, n)| (name.to_string(), n))
        .collect();
    let seen = every_command_during(&app, || async {
        for _ in 0..N {
            assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
        }
    })
    .await;
    assert_eq!(
        seen, expected,
        "every command Redis saw during {N} verifies"
    );

    // The cookie path costs the same.
    let seen = every_command_during(&app, || async {
        for _ in 0..N {
            let res = app
                .request(Method::GET, "/v1/verify")
                .header("cookie", format!("session={}", s.token))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    })
    .await;
    assert_eq!(
        seen, expected,
        "every command Redis saw during {N} cookie verifies"
    );
}

// --- retired key ids ---------------------------------------------------------------

/// Every command Redis counted, but the test's own `INFO`.
fn every_command(app: &TestApp) -> HashMap<String, u64> {
    let mut counts = app.command_counts();
    counts.remove("info");
    counts
}

/// When `kid` retires, from the ring in Redis (ms), if it is still listed.
fn retire_at(app: &TestApp, kid: &str) -> Option<i64> {
    let reply = app.redis_cmd(&["HGET", "sg:global", "ring"]);
    let json = reply.lines().nth(1).expect("the ring is stored");
    let ring: Value = serde_json::from_str(json).unwrap();
    ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .map(|k| k["retire_at"].as_i64().unwrap())
}

/// Rotates the key on `app` and waits for the refresher's read that the
/// rotation's event wakes, so it cannot land inside a later measurement.
async fn rotate_and_settle(app: &TestApp) -> String {
    // Its listener is subscribed, so the rotation's event wakes a read.
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        app.redis_cmd(&["PUBSUB", "NUMSUB", "sg:events"])
            .ends_with(":1\r\n")
    })
    .await;
    let reads = app.command_counts().get("hmget").copied().unwrap_or(0);
    let res = app.rotate_keys().await;
    assert_eq!(res.status(), StatusCode::OK);
    let kid = res.json::<Value>().await.unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        app.command_counts().get("hmget").copied().unwrap_or(0) > reads
    })
    .await;
    kid
}

/// A token of `kid` for `real`'s session, correctly signed, that stays
/// within `exp` for 15 s: `iat` 4 s ahead (the leeway is 5 s) and `exp` the
/// longest the 1 s lifetime allows (`iat` + lifetime + leeway).
fn long_lived_twin(real: &str, kid: &str, sid: Option<String>) -> String {
    let mut header = header_of(real);
    header.insert("kid".into(), json!(kid));
    let mut claims = claims_of(real);
    let iat = now_s() + 4;
    claims.insert("iat".into(), json!(iat));
    claims.insert("exp".into(), json!(iat + 6));
    if let Some(sid) = sid {
        claims.insert("sid".into(), json!(sid));
    }
    sign(&header, &claims, kid)
}

/// With a 1 s lifetime a rotated-out kid retires 7 s later (lifetime +
/// leeway + 1 s). Its tokens are then refused in-process with not a single
/// Redis command (the refresher runs every 120 s and its woken reads are
/// waited out): a token verified while the kid was valid (so in the
/// verified-token cache) and one never seen, both before and after a second
/// rotation drops the kid from the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_kid_is_refused_without_redis_even_when_cached() {
    let app = crate::helpers::spawn_app_with(&[
        ("ABSOLUTE_LIFETIME", "1s"),
        ("STATE_REFRESH_INTERVAL", "120s"),
        ("STATE_MAX_STALENESS", "240s"),
    ])
    .await;
    let s = app.create("alice", "laptop").await;
    // Loads the script (the 1 s session may already be gone on a slow machine).
    send_verify(&app, &s.token, "first verify").await;
    let old_kid = kid_of(&s.token);
    let cached = long_lived_twin(&s.token, &old_kid, None);
    // It passes every in-process check (one session read), so it is cached.
    let before = every_command(&app);
    send_verify(&app, &cached, "cached twin").await;
    assert_eq!(
        delta(&before, &every_command(&app), "echo"),
        1,
        "the twin did not reach Redis while its kid was valid"
    );

    let new_kid = rotate_and_settle(&app).await;
    let retires = retire_at(&app, &old_kid).expect("the old kid is retiring");
    assert!(retires > 0);
    // Still valid until then: a hit in the cache still reaches Redis.
    let before = every_command(&app);
    send_verify(&app, &cached, "cached twin, kid retiring").await;
    if crate::helpers::now_ms_wall() < retires {
        assert_eq!(delta(&before, &every_command(&app), "echo"), 1);
    }
    crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
        crate::helpers::now_ms_wall() > retires + 100
    })
    .await;

    let unseen = || long_lived_twin(&s.token, &old_kid, Some(fresh_session_id("alice")));
    for (what, token) in [("cached twin", cached.clone()), ("unseen twin", unseen())] {
        let before = every_command(&app);
        assert_refused_without_redis(&app, &token, what).await;
        assert_eq!(
            before,
            every_command(&app),
            "{what}: Redis was called for a retired kid"
        );
    }

    // A second rotation drops the retired kid from the ring altogether.
    let newest = rotate_and_settle(&app).await;
    assert_ne!(newest, new_kid);
    assert_eq!(
        retire_at(&app, &old_kid),
        None,
        "the retired kid is still listed"
    );
    for (what, token) in [
        ("cached twin, kid dropped", cached.clone()),
        ("unseen twin, kid dropped", unseen()),
    ] {
        let before = every_command(&app);
        assert_refused_without_redis(&app, &token, what).await;
        assert_eq!(
            before,
            every_command(&app),
            "{what}: Redis was called for a retired kid"
        );
    }
    // The retiring kid still verifies: one session read.
    let fresh = app.create("alice", "phone").await;
    assert_eq!(kid_of(&fresh.token), newest);
    let before = every_command(&app);
    send_verify(
        &app,
        &long_lived_twin(&fresh.token, &new_kid, None),
        "kid 2",
    )
    .await;
    assert_eq!(delta(&before, &every_command(&app), "echo"), 1);
}

/// A well-formed kid no ring of this deployment ever held, correctly signed
/// with the key derived for it (what a rotation made elsewhere would look
/// like): the first token costs one read of the global state (the refresh
/// that could have found a new kid), then the kid is known to be foreign
/// and refused with no Redis command at all. Never a session read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correctly_signed_foreign_kid_costs_one_state_read_then_none() {
    let app = crate::helpers::spawn_app_with(&[
        ("STATE_REFRESH_INTERVAL", "120s"),
        ("STATE_MAX_STALENESS", "240s"),
    ])
    .await;
    let s = live_session(&app, "alice", "laptop").await;
    let foreign = "Zm9yZWlnbi1raWQx";
    assert_eq!(foreign.len(), 16);
    let token = forge_header(&s.token, |h| {
        h.insert("kid".into(), json!(foreign));
    });
    let token = sign(&header_of(&token), &claims_of(&token), foreign);
    let before = every_command(&app);
    assert_error(
        send_verify(&app, &token, "foreign kid").await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    let after = every_command(&app);
    assert_eq!(delta(&before, &after, "hmget"), 1, "the one state read");
    // The state read is itself a script (read.lua, the only one running
    // HMGET): one EVALSHA for it, none for the session.
    assert_eq!(delta(&before, &after, "evalsha"), 1, "the state read");
    assert_eq!(delta(&before, &after, "echo"), 0, "a session read");
    for i in 0..3 {
        let before = every_command(&app);
        assert_refused_without_redis(&app, &token, "foreign kid again").await;
        assert_eq!(before, every_command(&app), "foreign kid, try {i}");
    }
    assert_eq!(app.verify_status(&s.token).await, StatusCode::OK);
}
