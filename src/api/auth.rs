//! Who is calling: a JWT (HS256) in `Authorization: Bearer …`, with the platform's claims,
//! and a per-token rate limit.

use super::ApiState;
use super::envelope::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Instant;

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
}

impl Claims {
    pub fn may_see(&self, patient: Option<&str>) -> bool {
        match (&self.patients, patient) {
            (None, _) => true,
            (Some(list), Some(p)) => list.iter().any(|x| x == p),
            // A scoped user sees nothing that belongs to no patient.
            (Some(_), None) => false,
        }
    }
}

/// Verifies tokens with the configured secret.
pub struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Keys {
    pub fn new(secret: &str) -> Keys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        Keys {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|t| t.claims)
            .map_err(|e| ApiError::unauthorized(format!("invalid token: {e}")))
    }

    /// Signs claims (the development token printed at start, and tests).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing does not fail")
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
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        let claims = state.keys.verify(token.trim())?;
        state.limiter.admit(&claims.sub)?;
        Ok(Auth(claims))
    }
}

/// A token bucket per subject: `per_minute` requests a minute, in bursts of as many.
pub struct Limiter {
    per_minute: f64,
    buckets: dashmap::DashMap<String, (f64, Instant)>,
}

impl Limiter {
    pub fn new(per_minute: u32) -> Limiter {
        Limiter {
            per_minute: f64::from(per_minute.max(1)),
            buckets: dashmap::DashMap::new(),
        }
    }

    pub fn admit(&self, subject: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut bucket = self
            .buckets
            .entry(subject.to_string())
            .or_insert((self.per_minute, now));
        let (tokens, last) = *bucket;
        let refilled = (tokens + now.duration_since(last).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        if refilled < 1.0 {
            *bucket = (refilled, now);
            let wait = (1.0 - refilled) * 60.0 / self.per_minute;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                format!("too many requests for this token; retry in {wait:.1} s"),
            )
            .details(serde_json::json!({ "retry_after_s": wait })));
        }
        *bucket = (refilled - 1.0, now);
        Ok(())
    }
}
