//! Shared test helpers: start a role's app on 127.0.0.1:0, build configs from env pairs, wait for
//! a condition with a bounded deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use access::config::Sources;
use access::role::Role;
use access::roles::{self, Settings};
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
pub fn config(pairs: &[(&str, &str)]) -> Settings {
    let sources = Sources::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    roles::load(&sources).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
}

/// Serves `router` wrapped by the shared machinery, as role `role`, on 127.0.0.1:0.
pub async fn serve(role: Role, config: Settings, router: Router) -> Running {
    let ctx = Context::new(role, Arc::new(config.shared), Shutdown::new());
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

/// Starts `role` through the binary's own dispatch (`roles::start`) on 127.0.0.1:0.
pub async fn start(role: Role, config: Settings) -> Running {
    let ctx = Context::new(role, Arc::new(config.shared.clone()), Shutdown::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let run_ctx = ctx.clone();
    let handle = tokio::spawn(async move {
        roles::start(role, listener, run_ctx, &config)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    Running { addr, ctx, handle }
}

/// Waits until `/ready` answers 200.
pub async fn wait_ready(url: &str) {
    let last = std::sync::Mutex::new(String::new());
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(r) = http().get(format!("{url}/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
                *last.lock().unwrap() = r.text().await.unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if ready.await.is_err() {
        panic!("not within 10s: {url}/ready is 200; it last said {}", last.lock().unwrap());
    }
}

/// A Redis key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// The built binary, running; killed when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `access <role> --port 0` and reads the bound address from its "listening" log line.
pub fn spawn_binary(role: &str, env: &[(&str, &str)]) -> Process {
    spawn_binary_with(role, env, &[])
}

/// As [`spawn_binary`], with more arguments (`--config FILE`).
pub fn spawn_binary_with(role: &str, env: &[(&str, &str)], args: &[&str]) -> Process {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_access"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ACCESS_SERVER__HOST", "127.0.0.1")
        .args([role, "--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                        sent = true;
                    }
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("the binary logs its address");
    Process { child, url: format!("http://{addr}") }
}

impl Process {
    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A database of its own for one test, dropped afterwards.
pub struct Db {
    pub name: String,
    pub dsn: String,
}

impl Db {
    pub async fn new() -> Db {
        let name = format!("access_test_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) =
            tokio_postgres::connect(POSTGRES_DSN, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        Db { dsn: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// A dev key in a temporary directory and tokens signed by it.
pub struct DevKeys {
    _dir: tempfile::TempDir,
    pub path: String,
    key: access::auth::devkey::DevKey,
}

impl DevKeys {
    pub fn new() -> DevKeys {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-key.json");
        let key = access::auth::devkey::DevKey::load_or_create(&path).unwrap();
        DevKeys { path: path.display().to_string(), key, _dir: dir }
    }

    pub fn token(&self, sub: &str, tenant: &str, roles: &[&str]) -> String {
        self.token_for(sub, tenant, roles, Duration::from_secs(600))
    }

    pub fn token_for(&self, sub: &str, tenant: &str, roles: &[&str], ttl: Duration) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        self.key
            .issue(&access::auth::devkey::TokenRequest {
                subject: sub,
                tenant,
                roles: &roles,
                ttl,
                issuer: None,
                audience: None,
            })
            .unwrap()
    }
}

/// A private PostgreSQL cluster on a free port (for outage tests; never the machine's own).
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl PrivatePostgres {
    fn bin(name: &str) -> String {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .max()
            .unwrap();
        format!("/usr/lib/postgresql/{}/bin/{name}", version.to_string_lossy())
    }

    fn as_postgres(args: &[&str]) -> std::process::Output {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .output()
            .unwrap()
    }

    pub async fn start() -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        assert!(std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success());
        let out = Self::as_postgres(&[
            &Self::bin("initdb"),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = closed_port().await;
        let pg = PrivatePostgres { dir, port };
        pg.up();
        pg
    }

    pub fn dsn(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn up(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let out = Self::as_postgres(&[
            &Self::bin("pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
            "-w",
            "start",
        ]);
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stdout));
    }

    pub fn down(&self) {
        let data = self.dir.path().join("data");
        let out = Self::as_postgres(&[
            &Self::bin("pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Self::as_postgres(&[
            &Self::bin("pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]);
    }
}

/// A validated config from a TOML file's text and `ACCESS_*` pairs.
pub fn config_with_file(toml: &str, pairs: &[(&str, &str)]) -> Settings {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, toml.as_bytes()).unwrap();
    let mut sources = Sources::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    sources.file = Some(file.path().to_path_buf());
    roles::load(&sources).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
}

/// A private redis-server on a free port, killed when dropped.
pub struct PrivateRedis {
    child: std::process::Child,
    pub url: String,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = closed_port().await;
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(5), "private redis up", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await;
        PrivateRedis { child, url: format!("redis://127.0.0.1:{port}") }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as in a hang.
    /// Stopping it (or dropping it) still ends it.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }
}

/// Sends `SIG<name>` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{name} {pid}");
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
