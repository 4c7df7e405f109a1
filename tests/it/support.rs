//! Shared test helpers: start a role's app on 127.0.0.1:0, build configs from env pairs, wait for
//! a condition with a bounded deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use access::config::{self, Config, Sources};
use access::roles::Role;
use access::server::{self, Context, Shutdown};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A server under test.
pub struct Running {
    pub addr: SocketAddr,
    pub ctx: Context,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.ctx.shutdown
    }
}

/// A validated config from `ACCESS_*` pairs (never the process environment).
pub fn config(pairs: &[(&str, &str)]) -> Config {
    let sources = Sources::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    config::load(&sources).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
}

/// Serves `router` wrapped by the shared machinery, as role `role`, on 127.0.0.1:0.
pub async fn serve(role: Role, config: Config, router: Router) -> Running {
    let ctx = Context::new(role, Arc::new(config), Shutdown::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = server::app(&ctx, router);
    let serve_ctx = ctx.clone();
    let handle = tokio::spawn(async move { server::serve(listener, app, &serve_ctx).await });
    Running { addr, ctx, handle }
}

/// An HTTP client that does not pool (so a test's connections are its own).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// Polls `check` until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not within {within:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared test broker started by `tests/services.sh`.
pub fn kafka_bootstrap() -> String {
    std::env::var("ACCESS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The machine's Redis.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The machine's PostgreSQL.
pub const POSTGRES_DSN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A local port nothing listens on (bound, then released).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Starts `role` through the binary's own dispatch (`cli::start`) on 127.0.0.1:0.
pub async fn start(role: Role, config: Config) -> Running {
    let ctx = Context::new(role, Arc::new(config), Shutdown::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let run_ctx = ctx.clone();
    let handle = tokio::spawn(async move {
        access::cli::start(role, listener, run_ctx)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    Running { addr, ctx, handle }
}

/// Waits until `/ready` answers 200.
pub async fn wait_ready(url: &str) {
    eventually(Duration::from_secs(10), &format!("{url}/ready is 200"), || async {
        let r = http().get(format!("{url}/ready")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// A Redis key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}
