//! Asymmetric signatures for others to verify: an Ed25519 key per kid of
//! the key ring, and their public halves as a JWK Set
//! (`GET /.well-known/jwks.json`, RFC 7517 / RFC 8037).
//!
//! Session tokens are HMAC-signed: only sessiongate checks them. What
//! sessiongate signs for *others* (the upstream assertion
//! `X-Session-Assertion`, security event tokens) needs a key whose public
//! half can be handed out, so each kid of the ring (`token::KeyRing`) also
//! names an Ed25519 key pair ("EdDSA", RFC 8037). They rotate together:
//! `POST /v1/admin/keys/rotate` makes a new kid active for both, and a kid
//! leaves the JWK Set when it retires from the ring.
//!
//! Why the private keys derive from `SESSIONGATE_SIGNING_SECRET` by HKDF:
//! - every instance must sign with the same key for a kid, and the secret is
//!   already the one thing all instances share; Redis keeps holding key ids
//!   only, so someone who can read Redis (or a backup of it) learns no
//!   private key;
//! - a rotation needs no key distribution: the new kid's key is derived on
//!   every instance when it reads the ring;
//! - the HKDF info label (`ed25519-signing-key:<kid>`) differs from the
//!   HMAC keys' (`jwt-signing-key:<kid>`), so the two keys of one kid are
//!   independent outputs: publishing an Ed25519 public key says nothing
//!   about the HMAC key of the same kid, and a token's HMAC key cannot sign
//!   an assertion (nor the reverse: the algorithms differ too, and verify
//!   accepts only the configured HMAC `alg`);
//! - Ed25519 takes any 32 bytes as a private key (its seed), so the HKDF
//!   output is used as is; ES256 would need rejection sampling.
//!
//! The cost is that every private key is exactly as safe as the secret,
//! which already mints session tokens: nothing new to protect.
//!
//! [`AsymRing::sign_jwt`] is the API other features use: it signs any
//! claims with the active kid.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use hkdf::Hkdf;
use serde::Serialize;
use sha2::Sha256;
use utoipa::ToSchema;

/// The JWS `alg` of every asymmetric signature sessiongate makes.
pub const ALG: &str = "EdDSA";

/// One Ed25519 key of the ring.
struct AsymKey {
    kid: String,
    /// When the kid retires (ms); `None` while it is active.
    retire_at_ms: Option<i64>,
    signing: SigningKey,
    /// `base64url(public key)`, the JWK's `x`.
    x: String,
}

/// The Ed25519 keys of one copy of the key ring.
pub struct AsymRing {
    keys: Vec<AsymKey>,
    /// Index of the active kid in `keys`.
    active: usize,
}

/// A JWK Set (RFC 7517 §5).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One public key (RFC 8037 §2: an `OKP` key on `Ed25519`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Jwk {
    /// Always `OKP`.
    #[schema(example = "OKP")]
    pub kty: &'static str,
    /// Always `Ed25519`.
    #[schema(example = "Ed25519")]
    pub crv: &'static str,
    /// The public key, base64url without padding.
    pub x: String,
    /// The key id, as in the signed tokens' `kid` header.
    pub kid: String,
    /// Always `EdDSA`.
    #[schema(example = "EdDSA")]
    pub alg: &'static str,
    /// Always `sig`.
    #[serde(rename = "use")]
    #[schema(example = "sig")]
    pub use_: &'static str,
}

#[derive(Serialize)]
struct JwsHeader<'a> {
    alg: &'static str,
    typ: &'a str,
    kid: &'a str,
}

/// The Ed25519 private key (seed) of `kid`.
fn derive_seed(secret: &[u8], kid: &str) -> [u8; 32] {
    let mut seed = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"sessiongate/v1"), secret)
        .expand(format!("ed25519-signing-key:{kid}").as_bytes(), &mut seed)
        .expect("32 bytes is a valid HKDF output length");
    seed
}

impl AsymRing {
    /// Derives the key of each `(kid, retire_at_ms)`; `active` must be one
    /// of the kids (the caller, `KeyRing::from_json`, checked it).
    pub fn derive<'a>(
        secret: &[u8],
        kids: impl IntoIterator<Item = (&'a str, Option<i64>)>,
        active: &str,
    ) -> AsymRing {
        let keys: Vec<AsymKey> = kids
            .into_iter()
            .map(|(kid, retire_at_ms)| {
                let signing = SigningKey::from_bytes(&derive_seed(secret, kid));
                let x = URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
                AsymKey {
                    kid: kid.to_string(),
                    retire_at_ms,
                    signing,
                    x,
                }
            })
            .collect();
        let active = keys
            .iter()
            .position(|k| k.kid == active)
            .expect("the active kid is one of the ring's kids");
        AsymRing { keys, active }
    }

    /// The kid new signatures are made with.
    pub fn active_kid(&self) -> &str {
        &self.keys[self.active].kid
    }

    /// A compact JWS (`header.claims.signature`) of `claims`, signed with
    /// the active kid, header `{"alg":"EdDSA","typ":"JWT","kid":…}`.
    pub fn sign_jwt<C: Serialize + ?Sized>(&self, claims: &C) -> String {
        self.sign_jwt_typed("JWT", claims)
    }

    /// [`sign_jwt`](Self::sign_jwt) with another `typ` header (e.g.
    /// `secevent+jwt` for RFC 8417 security event tokens).
    pub fn sign_jwt_typed<C: Serialize + ?Sized>(&self, typ: &str, claims: &C) -> String {
        let key = &self.keys[self.active];
        let header = JwsHeader {
            alg: ALG,
            typ,
            kid: &key.kid,
        };
        let mut out = String::with_capacity(256);
        URL_SAFE_NO_PAD.encode_string(
            serde_json::to_vec(&header).expect("a header serialises"),
            &mut out,
        );
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(
            serde_json::to_vec(claims).expect("claims serialise to JSON"),
            &mut out,
        );
        let signature = key.signing.sign(out.as_bytes());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut out);
        out
    }

    /// The public keys of every kid not retired at `now_ms`.
    pub fn jwks(&self, now_ms: i64) -> Jwks {
        Jwks {
            keys: self
                .keys
                .iter()
                .filter(|k| k.retire_at_ms.is_none_or(|t| t > now_ms))
                .map(|k| Jwk {
                    kty: "OKP",
                    crv: "Ed25519",
                    x: k.x.clone(),
                    kid: k.kid.clone(),
                    alg: ALG,
                    use_: "sig",
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ring() -> AsymRing {
        AsymRing::derive(SECRET, [("k1", Some(5_000)), ("k2", None)], "k2")
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Claims {
        sub: String,
        exp: u64,
    }

    /// Signed here, verified by jsonwebtoken from the JWK alone.
    #[test]
    fn a_signature_verifies_against_the_published_key_of_its_kid() {
        let ring = ring();
        let claims = Claims {
            sub: "alice".into(),
            exp: 4_000_000_000,
        };
        let jwt = ring.sign_jwt(&claims);
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some("k2"));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let jwks = ring.jwks(0);
        let jwk = jwks.keys.iter().find(|k| k.kid == "k2").unwrap();
        let key = DecodingKey::from_ed_components(&jwk.x).unwrap();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        let got = jsonwebtoken::decode::<Claims>(&jwt, &key, &validation).unwrap();
        assert_eq!(got.claims, claims);
        // The other kid's key does not verify it.
        let other = jwks.keys.iter().find(|k| k.kid == "k1").unwrap();
        let key = DecodingKey::from_ed_components(&other.x).unwrap();
        assert!(jsonwebtoken::decode::<Claims>(&jwt, &key, &validation).is_err());
    }

    #[test]
    fn keys_differ_per_kid_and_from_the_hmac_key_and_retired_kids_leave() {
        let ring = ring();
        let all = ring.jwks(0);
        assert_eq!(all.keys.len(), 2);
        assert_ne!(all.keys[0].x, all.keys[1].x);
        // Same secret and kid, other label: not the HMAC key's bytes.
        assert_ne!(
            derive_seed(SECRET, "k2").to_vec(),
            crate::token::derive_key(SECRET, "k2", Algorithm::HS256)
        );
        // The same secret gives the same keys on another instance.
        let again = AsymRing::derive(SECRET, [("k2", None)], "k2");
        assert_eq!(again.jwks(0).keys[0].x, all.keys[1].x);
        // k1 retires at 5000 ms.
        let later = ring.jwks(5_000);
        assert_eq!(
            later
                .keys
                .iter()
                .map(|k| k.kid.as_str())
                .collect::<Vec<_>>(),
            ["k2"]
        );
        let json = serde_json::to_value(&later).unwrap();
        assert_eq!(json["keys"][0]["use"], "sig");
        assert_eq!(json["keys"][0]["alg"], "EdDSA");
        assert_eq!(json["keys"][0]["kty"], "OKP");
        assert_eq!(json["keys"][0]["crv"], "Ed25519");
    }

    #[test]
    fn a_typed_signature_carries_its_typ() {
        let jwt = ring().sign_jwt_typed("secevent+jwt", &serde_json::json!({"jti": "1"}));
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.typ.as_deref(), Some("secevent+jwt"));
    }
}
