//! The HTTP side: REST under `/api/v1` (platform envelope, JWT roles, request ids,
//! idempotency, rate limits), and `/health`, `/ready`, `/metrics`. One axum server on
//! `[api] listen` (port 7000 by default), started by `vitalstream run`.
//!
//! - [`envelope`]: the response envelope, request ids, errors, the time limit.
//! - [`auth`]: JWT claims and roles, the per-token rate limit.
//! - [`idempotency`]: `Idempotency-Key` on POST.
//! - [`routes`]: the handlers.

pub mod auth;
pub mod envelope;
pub mod idempotency;
pub mod live;
pub mod routes;
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

/// `[api]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// HS256 secret for the platform's JWTs. Set it from the environment in production
    /// (`VITALSTREAM__API__JWT_SECRET`).
    pub jwt_secret: String,
    /// Print a development token (admin, one day) at start. For the embedded default only.
    pub dev_token: bool,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub body_limit: usize,
    /// Requests per minute per token subject.
    pub rate_limit_per_minute: u32,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Share socket.io rooms with other instances through this Redis (≥ 7), e.g.
    /// `redis://127.0.0.1:6379`. Absent: this instance only.
    pub redis_url: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            jwt_secret: "vitalstream-development-secret".into(),
            dev_token: true,
            request_timeout: Duration::from_secs(10),
            body_limit: 256 * 1024,
            rate_limit_per_minute: 600,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            redis_url: None,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState(Arc<Inner>);

pub struct Inner {
    pub engine: Control,
    pub keys: auth::Keys,
    pub limiter: auth::Limiter,
    pub idempotency: idempotency::Idempotency,
    /// The database, when storage is PostgreSQL; connected on first use.
    pub storage: Option<PostgresConfig>,
    db: tokio::sync::OnceCell<Db>,
    /// Rule edits read, change and write the whole set: one at a time.
    pub rule_edits: tokio::sync::Mutex<()>,
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
            keys: auth::Keys::new(&config.jwt_secret),
            limiter: auth::Limiter::new(config.rate_limit_per_minute),
            idempotency: idempotency::Idempotency::new(config.idempotency_ttl, config.body_limit),
            storage,
            db: tokio::sync::OnceCell::new(),
            rule_edits: tokio::sync::Mutex::new(()),
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
            .map_err(|e| envelope::ApiError::unavailable(format!("database: {e}")))
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
            state.clone(),
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

/// Serves until `stop` resolves. Connections send without delay (`TCP_NODELAY`): with
/// Nagle's algorithm, an `alert:critical` following another closely waited for the
/// client's delayed acknowledgement, 40 ms on Linux (the load harness's p90).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}
