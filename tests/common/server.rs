//! An API server of a test's own: a free port on 127.0.0.1, its own runtime, and tokens
//! signed with its key.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::runtime::Runtime;
use vitalstream::api::auth::{Claims, Role};
use vitalstream::api::{ApiConfig, ApiState, app, router, serve};

pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    rt: Runtime,
}

impl Server {
    /// REST, socket.io (with its pushers) and the page.
    pub fn start(config: &ApiConfig, state: ApiState) -> Server {
        let rt = runtime();
        let app = rt
            .block_on(app(config, state))
            .expect("socket.io starts (and reaches Redis when configured)");
        Server::serve(rt, app, config)
    }

    /// REST and the plain routes only.
    pub fn start_rest(config: &ApiConfig, state: ApiState) -> Server {
        Server::serve(runtime(), router(config, state), config)
    }

    fn serve(rt: Runtime, app: axum::Router, config: &ApiConfig) -> Server {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = config.clone();
        let task = rt.spawn(async move {
            serve(listener, app, &config, async {
                let _ = stopped.await;
            })
            .await
        });
        Server {
            addr,
            stop,
            task,
            rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving, checks the server ended cleanly, and drops the runtime with its
    /// pushers (which hold the engine's alert book).
    pub fn stop(self) {
        let _ = self.stop.send(());
        self.rt.block_on(self.task).unwrap().unwrap();
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A token valid for ten minutes, signed with the state's key.
pub fn token(state: &ApiState, sub: &str, role: Role, patients: Option<&[&str]>) -> String {
    token_for(state, sub, role, patients, Duration::from_secs(600))
}

/// A token valid for `lifetime`, signed with the state's key.
pub fn token_for(
    state: &ApiState,
    sub: &str,
    role: Role,
    patients: Option<&[&str]>,
    lifetime: Duration,
) -> String {
    let patients = patients.map(|p| p.iter().map(|s| s.to_string()).collect());
    state
        .keys
        .sign(&Claims::issue(sub, role, patients, lifetime))
}
