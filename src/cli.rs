//! The command line: one subcommand per role plus the tools around them, and the one `match` that
//! dispatches. Production binds its listeners here; roles are handed them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::Sources;
use crate::role::Role;
use crate::roles::{self, Deps, RunError, Settings};
use crate::server::{Context, Shutdown};
use crate::telemetry;

/// Exit code for a configuration problem (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for a dependency that cannot be reached at start-up (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for any other failure.
pub const EXIT_FAILURE: u8 = 1;

/// The 254Carbon Access Layer: gateway, stream, auth, entitlements and metrics in one binary.
///
/// Configuration layers, later winning: defaults, then `--config` (TOML or YAML), then ACCESS_*
/// environment variables (nested keys with `__`: ACCESS_SERVER__GRACE_PERIOD=5s), then flags.
#[derive(Debug, Parser)]
#[command(name = "access", version, about, long_about)]
pub struct Cli {
    /// A TOML (.toml) or YAML (.yaml) configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// REST reverse proxy: auth, entitlements, rate limits, cache, circuit breakers (port 8000).
    Gateway(Serve),
    /// Kafka topics to WebSocket and SSE clients (port 8001).
    Stream(Serve),
    /// JWT verification, introspection, revocation, user info (port 8010).
    Auth(Serve),
    /// Access rules and decisions (port 8011).
    Entitlements(Serve),
    /// Pushed metrics exported to Prometheus (port 8012).
    Metrics(Serve),
    /// Every role in one process on its usual port, plus a sample upstream for the gateway and
    /// sample price updates every second: the whole layer on one machine (`make run`).
    All(AllArgs),
    /// Subscribe to stream topics over WebSocket and print each frame (a client for trying the
    /// stream role).
    Subscribe(SubscribeArgs),
    /// Validate the configuration and the files it names; print every problem; exit 64 if any.
    CheckConfig,
    /// Print the effective configuration (secrets redacted) as JSON.
    PrintConfig,
    /// Print a dev-mode token signed by the dev key (dev mode only: no ACCESS_JWKS_URL).
    Token(TokenArgs),
}

/// Options of `access token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The subject (`sub`).
    #[arg(long)]
    pub sub: String,
    /// The tenant (`tenant_id`).
    #[arg(long)]
    pub tenant: String,
    /// Roles, comma-separated (`trader,admin`).
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Lifetime (`30m`, `1h`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: std::time::Duration,
}

/// Options of `access all`.
#[derive(Debug, Args)]
pub struct AllArgs {
    /// Port of the sample upstream (the gateway's default upstream groups point at 8100).
    #[arg(long, default_value_t = 8100)]
    pub upstream_port: u16,
    /// Do not publish sample updates.
    #[arg(long)]
    pub no_samples: bool,
}

/// Options of `access subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// Topics to subscribe to.
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,
    /// The stream role's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8001/ws/stream")]
    pub url: String,
    /// The token (default: $ACCESS_TOKEN).
    #[arg(long, env = "ACCESS_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Stop after this many data frames.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Options of a role subcommand.
#[derive(Debug, Args)]
pub struct Serve {
    /// Port to listen on (default: the role's own, see `print-config`).
    #[arg(long)]
    pub port: Option<u16>,
}

impl Cli {
    /// The configuration sources: the file, the given environment, and this command's flags.
    fn sources(&self, env: BTreeMap<String, String>) -> Sources {
        let mut sources = Sources { file: self.config.clone(), env, overrides: Vec::new() };
        if let Some((role, Serve { port: Some(port) })) = self.role() {
            sources = sources.with_override(&format!("{}.port", port_key(role)), *port);
        }
        sources
    }

    fn role(&self) -> Option<(Role, &Serve)> {
        match &self.command {
            Command::Gateway(s) => Some((Role::Gateway, s)),
            Command::Stream(s) => Some((Role::Stream, s)),
            Command::Auth(s) => Some((Role::Auth, s)),
            Command::Entitlements(s) => Some((Role::Entitlements, s)),
            Command::Metrics(s) => Some((Role::Metrics, s)),
            _ => None,
        }
    }
}

/// The config section holding a role's port.
fn port_key(role: Role) -> &'static str {
    role.as_str()
}

/// Runs the parsed command with this environment; the exit code says how it ended.
pub async fn run(cli: Cli, env: BTreeMap<String, String>) -> ExitCode {
    let sources = cli.sources(env);
    let loaded = roles::load(&sources);
    match (&cli.command, loaded) {
        (Command::CheckConfig, Ok(_)) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        (Command::PrintConfig, Ok(config)) => match serde_json::to_string_pretty(&config) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot print the configuration: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        (Command::Token(args), Ok(config)) => print_token(args, &config),
        (Command::Subscribe(args), _) => subscribe(args).await,
        (Command::All(args), Ok(config)) => {
            let config = Arc::new(config);
            let telemetry = match telemetry::init(&config, "access") {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let code = serve_all(args, config).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            code
        }
        (_, Err(errors)) => {
            eprintln!("configuration has {} problem(s):", errors.0.len());
            for problem in &errors.0 {
                eprintln!("  {problem}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
        (_, Ok(config)) => {
            let Some((role, _)) = cli.role() else { return ExitCode::from(EXIT_FAILURE) };
            let config = Arc::new(config);
            let telemetry = match telemetry::init(&config, role.service_name()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let code = serve_role(role, config).await;
            // The exporter's blocking client must not be shut down on a runtime thread.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            code
        }
    }
}

fn print_token(args: &TokenArgs, config: &Settings) -> ExitCode {
    if config.jwks_url.is_some() || config.env == crate::config::Environment::Production {
        eprintln!("error: `access token` works in dev mode only (no ACCESS_JWKS_URL, ACCESS_ENV not production); get tokens from the identity provider");
        return ExitCode::from(EXIT_CONFIG);
    }
    let path = config.auth.dev_key_path();
    let issued = crate::auth::devkey::DevKey::load_or_create(&path).and_then(|key| {
        key.issue(&crate::auth::devkey::TokenRequest {
            subject: &args.sub,
            tenant: &args.tenant,
            roles: &args.roles,
            ttl: args.ttl,
            issuer: config.auth.issuer.as_deref(),
            audience: config.auth.audience.as_deref(),
        })
    });
    match issued {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: dev key {}: {e}", path.display());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Binds the role's port, starts the shutdown sequence on signals, and runs the role.
async fn serve_role(role: Role, config: Arc<Settings>) -> ExitCode {
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().on_signal(config.server.grace_period));
    let addr = (config.server.host, config.port(role));
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(role = %role, addr = ?addr, error = %e, "cannot bind");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let ctx = Context::new(role, Arc::new(config.shared.clone()), shutdown);
    match roles::start(role, listener, ctx, &config).await {
        Ok(()) => {
            tracing::info!(role = %role, "stopped");
            ExitCode::SUCCESS
        }
        Err(RunError::Unavailable(e)) => {
            tracing::error!(role = %role, error = %e, "a dependency is unavailable at start-up");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(RunError::Other(e)) => {
            tracing::error!(role = %role, error = format!("{e:#}"), "role failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `access all`: binds every role's port (and the sample upstream's), then runs the roles in this
/// process with one auth, one shutdown and the other roles' URLs pointing here.
async fn serve_all(args: &AllArgs, config: Arc<Settings>) -> ExitCode {
    let ports: std::collections::HashMap<Role, u16> =
        Role::ALL.iter().map(|r| (*r, config.port(*r))).collect();
    let local = |role: Role| url::Url::parse(&format!("http://127.0.0.1:{}", ports[&role])).ok();
    let mut config = (*config).clone();
    config.auth_service_url = config.auth_service_url.clone().or_else(|| local(Role::Auth));
    config.entitlements_service_url =
        config.entitlements_service_url.clone().or_else(|| local(Role::Entitlements));
    config.metrics_service_url =
        config.metrics_service_url.clone().or_else(|| local(Role::Metrics));
    // The console's relay reaches the gateway and the stream of this process.
    config.console.gateway_url =
        config.console.gateway_url.clone().or_else(|| local(Role::Gateway));
    config.console.stream_url = config.console.stream_url.clone().or_else(|| local(Role::Stream));
    // The gateway's built-in upstream groups point at the sample upstream, wherever it listens.
    if config.gateway.upstreams == roles::gateway::Config::default().upstreams {
        let sample = url::Url::parse(&format!("http://127.0.0.1:{}", args.upstream_port));
        for urls in config.gateway.upstreams.values_mut() {
            *urls = sample.iter().cloned().collect();
        }
    }
    let config = Arc::new(config);
    let shutdown = Shutdown::new();
    tokio::spawn(shutdown.clone().on_signal(config.server.grace_period));
    let mut listeners = Vec::new();
    for role in Role::ALL {
        let addr = (config.server.host, config.port(role));
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push((role, l)),
            Err(e) => {
                tracing::error!(role = %role, addr = ?addr, error = %e, "cannot bind");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        }
    }
    let upstream = match TcpListener::bind(("127.0.0.1", args.upstream_port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = args.upstream_port, error = %e, "cannot bind the sample upstream");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(upstream, crate::sample::upstream())
            .with_graceful_shutdown(async move { stopping.stopping().await })
            .await;
    });
    let shared = Arc::new(config.shared.clone());
    let mut auth_ctx = Context::new(Role::Auth, shared.clone(), shutdown.clone());
    // One bus of rules versions for every role of the process: a rule change reaches the
    // gateway's and the stream's rules without Redis.
    let rules_bus = crate::server::rules_bus::RulesBus::default();
    auth_ctx.rules_bus = rules_bus.clone();
    let auth = match crate::auth::Auth::build(&auth_ctx).await {
        Ok(a) => a,
        Err(e) => return exit_for(Role::Auth, e.into()),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (role, listener) in listeners {
        let ctx = if role == Role::Auth {
            auth_ctx.clone()
        } else {
            let mut ctx = Context::new(role, shared.clone(), shutdown.clone());
            ctx.rules_bus = rules_bus.clone();
            auth.add_checks(&ctx);
            ctx
        };
        let deps = Deps { ctx, auth: auth.clone() };
        let settings = config.clone();
        tasks
            .spawn(async move { (role, roles::start_with(role, listener, deps, &settings).await) });
    }
    if !args.no_samples {
        match crate::auth::token_source::for_role(&auth_ctx, &auth) {
            Ok(tokens) => {
                let topics = &config.stream.topics;
                let find = |resource: &str| {
                    topics.iter().find(|t| t.resource == resource).map(|t| t.name.clone())
                };
                let stream = local(Role::Stream).expect("a valid URL");
                crate::sample::spawn_publisher(
                    stream,
                    find("market_data"),
                    find("curve"),
                    tokens,
                    shutdown.clone(),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "no service token; sample updates are not published")
            }
        }
    }
    tracing::info!(upstream = args.upstream_port, "access all: every role is starting");
    if config.console.enabled {
        tracing::info!(url = %format!("http://localhost:{}/console/", ports[&Role::Auth]), "the operator's console");
    }
    let mut code = ExitCode::SUCCESS;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((role, Err(e))) => {
                code = exit_for(role, e);
                shutdown.stop();
            }
            Err(e) => {
                tracing::error!(error = %e, "a role panicked");
                code = ExitCode::from(EXIT_FAILURE);
                shutdown.stop();
            }
        }
    }
    code
}

fn exit_for(role: Role, e: RunError) -> ExitCode {
    match e {
        RunError::Unavailable(e) => {
            tracing::error!(role = %role, error = %e, "a dependency is unavailable at start-up");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        RunError::Other(e) => {
            tracing::error!(role = %role, error = format!("{e:#}"), "role failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `access subscribe`: a WebSocket client that prints the stream's frames, one JSON per line.
async fn subscribe(args: &SubscribeArgs) -> ExitCode {
    use std::io::Write as _;

    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = match args.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", args.url);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Ok(value) = format!("Bearer {}", args.token).parse() {
        request.headers_mut().insert(http::header::AUTHORIZATION, value);
    }
    let mut ws = match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            eprintln!("error: {} refused the connection: HTTP {} {body}", args.url, r.status());
            return ExitCode::from(EXIT_FAILURE);
        }
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", args.url);
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let subscribe = serde_json::json!({"action": "subscribe", "topics": args.topics, "id": 1});
    if ws.send(Message::text(subscribe.to_string())).await.is_err() {
        return ExitCode::from(EXIT_FAILURE);
    }
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(t)) => {
                // `println!` panics when the reader went away (`access subscribe | head`); a
                // closed pipe is the reader saying it has seen enough.
                if let Err(e) = writeln!(stdout, "{t}").and_then(|()| stdout.flush()) {
                    let _ = ws.close(None).await;
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return ExitCode::SUCCESS;
                    }
                    eprintln!("error: cannot write to stdout: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
                if t.contains("\"type\":\"data\"") {
                    seen += 1;
                    if args.count.is_some_and(|n| seen >= n) {
                        let _ = ws.close(None).await;
                        return ExitCode::SUCCESS;
                    }
                }
            }
            Ok(Message::Close(c)) => {
                eprintln!("closed by the server: {c:?}");
                return ExitCode::from(EXIT_FAILURE);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    ExitCode::SUCCESS
}
