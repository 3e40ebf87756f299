//! The HTTP side: REST under `/api/v1` (platform envelope, JWT roles, request ids,
//! idempotency, rate limits), and `/health`, `/ready`, `/metrics`. One axum server on
//! `[api] listen` (port 7000 by default), started by `vitalstream run`.
//!
//! - [`server`]: the connections: limits, header-read and idle timeouts.
//! - [`envelope`]: the response envelope, request ids, errors, the time limit.
//! - [`auth`]: JWT claims and roles, the per-token rate limit, the failed-login limit per
//!   client address.
//! - [`idempotency`]: `Idempotency-Key` on POST.
//! - [`routes`]: the handlers.
//! - [`socket`], [`live`]: socket.io, and the page with its event stream.
//!
//! SECURITY.md at the repository root says who may do what, and every limit.

pub mod auth;
pub mod envelope;
pub mod idempotency;
pub mod live;
pub mod routes;
pub mod server;
pub mod socket;

use crate::engine::Control;
use crate::sinks::postgres::PostgresConfig;
use crate::sinks::postgres::query::Db;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The secret of the embedded default: public, so good for development only.
pub const DEVELOPMENT_SECRET: &str = "vitalstream-development-secret";

/// The shortest secret accepted outside development mode (HS256 wants at least its hash's
/// 32 bytes).
pub const MIN_SECRET_BYTES: usize = 32;

/// `[api]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Serve REST, socket.io and the page at all.
    pub enabled: bool,
    pub listen: SocketAddr,
    /// HS256 secret for the platform's JWTs: at least 32 bytes, and not the public
    /// development secret, unless `dev_token = true`. Set it from the environment in
    /// production (`VITALSTREAM__API__JWT_SECRET`).
    pub jwt_secret: String,
    /// Development mode: accept the public development secret and print an admin token at
    /// start. Only the embedded default sets it; a config file that does not write
    /// `dev_token = true` itself (and a secret given in the environment) turns it off.
    pub dev_token: bool,
    /// Longest a request may take (then 504), and how long requests in flight may finish
    /// when the service stops.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Requests per minute per token subject.
    pub rate_limit_per_minute: u32,
    /// Failed authentications (no token, a bad or expired one) per minute per client
    /// address; past it, such requests are answered 429. A valid token is never refused
    /// for its address's failures.
    pub auth_failures_per_minute: u32,
    /// Clock difference allowed when checking a token's `exp`, `nbf` and `iat` (at most 60 s).
    #[serde(with = "humantime_serde")]
    pub token_leeway: Duration,
    /// Longest a token may be valid: one whose `exp - iat` (without `iat`: `exp` - now) is
    /// longer is refused.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// Connections open at once; past it, new ones wait in the listen backlog until one
    /// closes. Keep it well under the process's file-descriptor limit (`ulimit -n`), which
    /// storage, MQTT, Kafka and files share.
    pub max_connections: usize,
    /// Connections open at once from one client address (an IPv6 /64 counts as one); past it
    /// a new one is answered 429 and closed. 0 = no limit. Raise it when clients come
    /// through a proxy.
    pub max_connections_per_client: usize,
    /// A connection must send a whole request head within this of opening, or of its
    /// previous answer (so idle keep-alive connections close after this too).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection on which nothing is read or written for this long is closed: stalled
    /// uploads, unread streams, dead websockets. Keep it above socket.io's ping interval
    /// plus timeout (45 s).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Share socket.io rooms with other instances through this Redis (≥ 7), e.g.
    /// `redis://127.0.0.1:6379`. Absent: this instance only.
    pub redis_url: Option<String>,
}

impl Default for ApiConfig {
    /// As `config/default.toml` has it: development mode.
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            jwt_secret: DEVELOPMENT_SECRET.into(),
            dev_token: true,
            request_timeout: Duration::from_secs(10),
            body_limit: 256 * 1024,
            rate_limit_per_minute: 600,
            auth_failures_per_minute: 30,
            token_leeway: Duration::from_secs(5),
            max_token_lifetime: Duration::from_secs(12 * 3600),
            max_connections: 512,
            max_connections_per_client: 64,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            redis_url: None,
        }
    }
}

impl ApiConfig {
    /// Settings that cannot work, reported with the rest of the configuration.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(format!("[api] {problem}"));
            }
        };
        check(
            self.token_leeway <= Duration::from_secs(60),
            "token_leeway must be at most 60s",
        );
        check(
            self.max_token_lifetime >= Duration::from_secs(60),
            "max_token_lifetime must be at least 1m",
        );
        check(self.max_connections > 0, "max_connections must be positive");
        check(
            !self.header_read_timeout.is_zero(),
            "header_read_timeout must be positive",
        );
        check(
            self.idle_timeout >= Duration::from_secs(1),
            "idle_timeout must be at least 1s",
        );
        check(
            !self.request_timeout.is_zero(),
            "request_timeout must be positive",
        );
        check(
            self.rate_limit_per_minute > 0 && self.auth_failures_per_minute > 0,
            "rate_limit_per_minute and auth_failures_per_minute must be positive",
        );
        problems
    }

    /// Whether the API may start with this secret. In development mode (`dev_token = true`)
    /// any secret but an empty one; otherwise at least [`MIN_SECRET_BYTES`] bytes, and not
    /// the public [`DEVELOPMENT_SECRET`], which anyone can sign an admin token with.
    pub fn secret_problem(&self) -> Option<String> {
        let secret = &self.jwt_secret;
        if secret.trim().is_empty() {
            return Some("[api] jwt_secret is empty".into());
        }
        if self.dev_token {
            return None;
        }
        if secret == DEVELOPMENT_SECRET {
            Some(
                "[api] jwt_secret is the public development secret: set a secret of your own \
                 (VITALSTREAM__API__JWT_SECRET), or write `dev_token = true` for development"
                    .into(),
            )
        } else if secret.len() < MIN_SECRET_BYTES {
            Some(format!(
                "[api] jwt_secret has {} bytes: outside development mode (dev_token = true) \
                 it needs at least {MIN_SECRET_BYTES}",
                secret.len()
            ))
        } else {
            None
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState(Arc<Inner>);

pub struct Inner {
    pub engine: Control,
    pub keys: auth::Keys,
    /// Requests per token subject.
    pub limiter: auth::Limiter<String>,
    /// Failed authentications per client address.
    pub failures: auth::Limiter<std::net::IpAddr>,
    pub idempotency: Arc<idempotency::Idempotency>,
    /// The database, when storage is PostgreSQL; connected on first use.
    pub storage: Option<PostgresConfig>,
    db: tokio::sync::OnceCell<Db>,
    /// Rule edits read, change and write the whole set: one at a time.
    pub rule_edits: tokio::sync::Mutex<()>,
    /// The last readiness answer and when it was made: `/ready` checks at most once a second.
    pub ready_cache: tokio::sync::Mutex<Option<(std::time::Instant, bool, serde_json::Value)>>,
    /// Every alert transition (for the page's event stream).
    pub bus: Option<AlertBus>,
    /// Device commands go out through the MQTT source, when there is one.
    pub commands: Option<crate::sources::mqtt::Commands>,
    /// The MQTT source's connection state, for readiness.
    pub mqtt_up: Option<Arc<crate::link::Link>>,
    /// The Kafka source's state (brokers answer, partitions assigned), for readiness.
    pub kafka_up: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The Redis that socket.io rooms are shared through, for readiness.
    pub redis_url: Option<String>,
    /// `notification:new` messages on their way to socket.io rooms.
    pub notices: tokio::sync::broadcast::Sender<Arc<socket::Notice>>,
    /// Report requests go to RabbitMQ through this, when the service has `[notifications]`.
    pub tasks: Option<crate::tasks::publisher::Publisher>,
}

impl std::ops::Deref for ApiState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl ApiState {
    pub fn new(config: &ApiConfig, engine: Control, storage: Option<PostgresConfig>) -> ApiState {
        Self::with_bus(config, engine, storage, None)
    }

    pub fn with_bus(
        config: &ApiConfig,
        engine: Control,
        storage: Option<PostgresConfig>,
        bus: Option<AlertBus>,
    ) -> ApiState {
        ApiState(Arc::new(Inner {
            engine,
            keys: auth::Keys::with_limits(
                &config.jwt_secret,
                config.token_leeway,
                config.max_token_lifetime,
            ),
            limiter: auth::Limiter::new(config.rate_limit_per_minute),
            failures: auth::Limiter::new(config.auth_failures_per_minute),
            idempotency: Arc::new(
                idempotency::Idempotency::new(config.idempotency_ttl, config.body_limit)
                    .verifying_with(auth::Keys::with_limits(
                        &config.jwt_secret,
                        config.token_leeway,
                        config.max_token_lifetime,
                    )),
            ),
            storage,
            db: tokio::sync::OnceCell::new(),
            rule_edits: tokio::sync::Mutex::new(()),
            ready_cache: tokio::sync::Mutex::new(None),
            bus,
            commands: None,
            mqtt_up: None,
            kafka_up: None,
            redis_url: config.redis_url.clone(),
            notices: tokio::sync::broadcast::channel(1024).0,
            tasks: None,
        }))
    }

    /// Sends report requests to RabbitMQ through `tasks` (call before sharing the state).
    pub fn with_tasks(self, tasks: Option<crate::tasks::publisher::Publisher>) -> ApiState {
        let mut inner = Arc::try_unwrap(self.0)
            .unwrap_or_else(|_| panic!("with_tasks is called before the state is shared"));
        inner.tasks = tasks;
        ApiState(Arc::new(inner))
    }

    /// Sends device commands through the MQTT source and reports its connection in
    /// `/ready` (call before sharing the state).
    pub fn with_mqtt(
        self,
        commands: Option<crate::sources::mqtt::Commands>,
        up: Option<Arc<crate::link::Link>>,
    ) -> ApiState {
        let mut inner = Arc::try_unwrap(self.0)
            .unwrap_or_else(|_| panic!("with_mqtt is called before the state is shared"));
        inner.commands = commands;
        inner.mqtt_up = up;
        ApiState(Arc::new(inner))
    }

    /// Reports the Kafka source's state in `/ready` (call before sharing the state).
    pub fn with_kafka(self, up: Option<Arc<std::sync::atomic::AtomicBool>>) -> ApiState {
        let mut inner = Arc::try_unwrap(self.0)
            .unwrap_or_else(|_| panic!("with_kafka is called before the state is shared"));
        inner.kafka_up = up;
        ApiState(Arc::new(inner))
    }

    /// The database, or why not.
    pub async fn db(&self) -> Result<&Db, envelope::ApiError> {
        let Some(config) = &self.storage else {
            return Err(envelope::ApiError::unavailable(
                "no PostgreSQL storage is configured",
            ));
        };
        self.db
            .get_or_try_init(|| Db::connect(config))
            .await
            .map_err(envelope::ApiError::storage)
    }
}

/// The alert bus the sinks publish every transition on (socket.io, and the page's SSE).
pub type AlertBus = tokio::sync::broadcast::Sender<Arc<crate::alerts::AlertEvent>>;

/// The whole HTTP surface with socket.io, whose pushers (alerts from the state's bus,
/// vitals) start on the current runtime.
pub async fn app(config: &ApiConfig, state: ApiState) -> anyhow::Result<Router> {
    socket::attach(
        router(config, state.clone()),
        &state,
        config.redis_url.as_deref(),
    )
    .await
}

/// The HTTP routes (REST, health, metrics), without socket.io.
pub fn router(config: &ApiConfig, state: ApiState) -> Router {
    let timeout = config.request_timeout;
    let api = routes::api()
        .layer(axum::middleware::from_fn_with_state(
            state.idempotency.clone(),
            idempotency::idempotency,
        ))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            envelope::envelope(timeout, req, next)
        }));
    Router::new()
        .nest("/api/v1", api)
        .merge(routes::plain())
        .with_state(state)
}

/// Serves until `stop` resolves, with `config`'s connection limits and timeouts (see
/// [`server`]). Connections send without delay (`TCP_NODELAY`): with Nagle's algorithm, an
/// `alert:critical` following another closely waited for the client's delayed
/// acknowledgement, 40 ms on Linux (the load harness's p90).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: &ApiConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router, server::Limits::from(config), stop).await
}
