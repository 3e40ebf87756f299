//! Who is calling: a JWT (HS256) in `Authorization: Bearer …`, with the platform's claims;
//! a rate limit per token subject; and a limit on failed authentications per client
//! address.
//!
//! A token is accepted when its signature is the configured secret's (HS256 only: `none`
//! and every other algorithm are refused), it has `sub` and `exp`, it is not expired and
//! not before its `nbf` (both with `[api] token_leeway`, a few seconds), its `iat` is not in
//! the future, and it is not valid for longer than `[api] max_token_lifetime`
//! (`exp - iat`, or `exp` - now without `iat`). A refusal says which of these failed in
//! plain words and nothing of the library's.

use super::ApiState;
use super::envelope::ApiError;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Analyst,
    Clinician,
    Service,
}

/// The token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    /// Patients this user may see; absent = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<Vec<String>>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

impl Claims {
    /// Claims issued now, valid for `lifetime`.
    pub fn issue(
        sub: impl Into<String>,
        role: Role,
        patients: Option<Vec<String>>,
        lifetime: Duration,
    ) -> Claims {
        let now = now_secs();
        Claims {
            sub: sub.into(),
            role,
            patients,
            exp: now + lifetime.as_secs(),
            iat: Some(now),
            nbf: None,
        }
    }

    pub fn may_see(&self, patient: Option<&str>) -> bool {
        match (&self.patients, patient) {
            (None, _) => true,
            (Some(list), Some(p)) => list.iter().any(|x| x == p),
            // A scoped user sees nothing that belongs to no patient.
            (Some(_), None) => false,
        }
    }

    /// How long until the token expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now_secs()))
    }
}

fn now_secs() -> u64 {
    (crate::model::now_millis() / 1000).max(0) as u64
}

/// Verifies tokens with the configured secret.
pub struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    leeway: u64,
    max_lifetime: u64,
}

impl Keys {
    /// Keys with the default leeway (5 s) and longest lifetime (12 h).
    pub fn new(secret: &str) -> Keys {
        Keys::with_limits(
            secret,
            Duration::from_secs(5),
            Duration::from_secs(12 * 3600),
        )
    }

    pub fn with_limits(secret: &str, leeway: Duration, max_lifetime: Duration) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = leeway.as_secs();
        Keys {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
            leeway: leeway.as_secs(),
            max_lifetime: max_lifetime.as_secs(),
        }
    }

    /// The longest lifetime a token may have.
    pub fn max_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_lifetime)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|t| t.claims)
            .map_err(|e| {
                // The library's own words name its internals (algorithm lists, serde
                // variants): say what is wrong in ours.
                ApiError::unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid (nbf)",
                    _ => "invalid token",
                })
            })?;
        let now = now_secs();
        let lifetime = match claims.iat {
            Some(iat) if iat > now + self.leeway => {
                return Err(ApiError::unauthorized("token issued in the future (iat)"));
            }
            Some(iat) => claims.exp.saturating_sub(iat),
            None => claims.exp.saturating_sub(now),
        };
        if lifetime > self.max_lifetime {
            return Err(ApiError::unauthorized(format!(
                "token valid for longer than the {} s allowed",
                self.max_lifetime
            )));
        }
        Ok(claims)
    }

    /// Signs claims (the development token printed at start, and tests).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing does not fail")
    }
}

/// The client address of a request, when it came through [`super::serve`].
pub fn client_of(parts: &Parts) -> Option<SocketAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

impl ApiState {
    /// Verifies `token` from `client`. A failure counts against the client address's
    /// `auth_failures_per_minute`; past it, failures are answered 429 instead of 401.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<Claims, ApiError> {
        let verified = match token {
            None => Err(ApiError::unauthorized(
                "missing Authorization: Bearer <token>",
            )),
            Some(token) => self.keys.verify(token.trim()),
        };
        verified.map_err(|refusal| self.failed(refusal, client))
    }

    /// Counts a failed authentication from `client`: the refusal, or 429 past the limit.
    pub(super) fn failed(&self, refusal: ApiError, client: Option<SocketAddr>) -> ApiError {
        // Without an address (a router used without `serve`), the failures share one.
        let ip = client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.ip());
        match self.failures.admit(super::server::client_key(ip)) {
            Ok(()) => refusal,
            Err(wait) => limited(wait, "too many failed authentications from this address"),
        }
    }
}

/// A caller whose token checked out, and who is within the rate limit.
pub struct Auth(pub Claims);

impl Auth {
    /// Refuses callers whose role is not one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.0.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "role {:?} may not do this (needs one of {roles:?})",
                self.0.role
            )))
        }
    }

    /// Refuses tokens with a `patients` list: what they would do reaches every patient
    /// (rules run over, and read, all patients' readings).
    pub fn unscoped(&self) -> Result<(), ApiError> {
        match self.0.patients {
            None => Ok(()),
            Some(_) => Err(ApiError::forbidden(
                "this token is limited to some patients: rules act on every patient",
            )),
        }
    }

    pub fn may_see(&self, patient: Option<&str>) -> Result<(), ApiError> {
        if self.0.may_see(patient) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this token does not cover that patient",
            ))
        }
    }
}

impl FromRequestParts<ApiState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Auth, ApiError> {
        let client = client_of(parts);
        let token = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(h) => match h.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")) {
                Some(token) => Some(token),
                None => {
                    let refusal = ApiError::unauthorized("Authorization must be `Bearer <token>`");
                    return Err(state.failed(refusal, client));
                }
            },
        };
        let claims = state.authenticate(token, client)?;
        state
            .limiter
            .admit(claims.sub.clone())
            .map_err(|wait| limited(wait, "too many requests for this token"))?;
        Ok(Auth(claims))
    }
}

/// 429, with when to try again.
pub(super) fn limited(wait: f64, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        format!("{what}; retry in {wait:.1} s"),
    )
    .details(serde_json::json!({ "retry_after_s": wait }))
}

/// A token bucket per key: `per_minute` a minute, in bursts of as many. Buckets that have
/// refilled are forgotten once there are many, so a flood of keys (addresses) does not
/// grow it without bound.
pub struct Limiter<K: Hash + Eq = String> {
    per_minute: f64,
    buckets: dashmap::DashMap<K, (f64, Instant)>,
}

/// Keys kept before full buckets are swept out.
const SWEEP_ABOVE: usize = 10_000;

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(per_minute: u32) -> Limiter<K> {
        Limiter {
            per_minute: f64::from(per_minute.max(1)),
            buckets: dashmap::DashMap::new(),
        }
    }

    /// Takes one from `key`'s bucket, or says how many seconds until there is one.
    pub fn admit(&self, key: K) -> Result<(), f64> {
        let now = Instant::now();
        if self.buckets.len() > SWEEP_ABOVE {
            // A bucket untouched for a minute is full again: it is as good as absent.
            self.buckets
                .retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(60));
        }
        let mut bucket = self.buckets.entry(key).or_insert((self.per_minute, now));
        let (tokens, last) = *bucket;
        let refilled = (tokens + now.duration_since(last).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        if refilled < 1.0 {
            *bucket = (refilled, now);
            return Err((1.0 - refilled) * 60.0 / self.per_minute);
        }
        *bucket = (refilled - 1.0, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn sign(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn refusal(keys: &Keys, token: &str) -> String {
        keys.verify(token).unwrap_err().message
    }

    #[test]
    fn nbf_iat_leeway_and_lifetime_are_checked_and_refusals_say_no_more_than_needed() {
        let keys = Keys::with_limits(SECRET, Duration::from_secs(5), Duration::from_secs(3600));
        let now = now_secs();
        let ok =
            sign(serde_json::json!({"sub": "a", "role": "admin", "iat": now, "exp": now + 600}));
        assert!(keys.verify(&ok).is_ok());
        // Not before a minute from now: refused; within the leeway: accepted.
        let early =
            serde_json::json!({"sub": "a", "role": "admin", "nbf": now + 60, "exp": now + 600});
        assert_eq!(refusal(&keys, &sign(early)), "token not yet valid (nbf)");
        let nearly =
            serde_json::json!({"sub": "a", "role": "admin", "nbf": now + 3, "exp": now + 600});
        assert!(keys.verify(&sign(nearly)).is_ok());
        // Expired 30 s ago: refused (the leeway is 5 s, not 60).
        let late = serde_json::json!({"sub": "a", "role": "admin", "exp": now - 30});
        assert_eq!(refusal(&keys, &sign(late)), "token expired");
        // Lifetimes past the limit, with iat and without.
        let long =
            serde_json::json!({"sub": "a", "role": "admin", "iat": now - 10, "exp": now + 3600});
        assert!(refusal(&keys, &sign(long)).contains("longer than"));
        let far = serde_json::json!({"sub": "a", "role": "admin", "exp": now + 86_400});
        assert!(refusal(&keys, &sign(far)).contains("longer than"));
        let future =
            serde_json::json!({"sub": "a", "role": "admin", "iat": now + 600, "exp": now + 900});
        assert!(refusal(&keys, &sign(future)).contains("iat"));
        // `alg: none` and garbage: a plain "invalid token", nothing of the library.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            "eyJzdWIiOiJhIiwicm9sZSI6ImFkbWluIiwiZXhwIjo5OTk5OTk5OTk5fQ"
        );
        assert_eq!(refusal(&keys, &none), "invalid token");
        assert_eq!(refusal(&keys, "not.a.token"), "invalid token");
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let limiter: Limiter<u32> = Limiter::new(2);
        assert!(limiter.admit(1).is_ok());
        assert!(limiter.admit(1).is_ok());
        let wait = limiter.admit(1).unwrap_err();
        assert!(wait > 0.0 && wait <= 30.0, "{wait}");
        assert!(limiter.admit(2).is_ok());
    }
}
