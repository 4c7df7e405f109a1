//! The command line: one subcommand per role plus the tools around them, and the one `match` that
//! dispatches. Production binds its listeners here; roles are handed them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{self, Config, Sources};
use crate::roles::{self, Role};
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
    let loaded = config::load(&sources);
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

fn print_token(args: &TokenArgs, config: &Config) -> ExitCode {
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
async fn serve_role(role: Role, config: Arc<Config>) -> ExitCode {
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
    let ctx = Context::new(role, config, shutdown);
    match start(role, listener, ctx).await {
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

/// Why a role stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A backend or the IdP could not be reached at start-up.
    #[error(transparent)]
    Unavailable(#[from] crate::backends::BackendError),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The one dispatch from a role to its module: build the role's state (I/O, no binding), then run
/// it on the listener.
pub async fn start(role: Role, listener: TcpListener, ctx: Context) -> Result<(), RunError> {
    match role {
        Role::Auth => {
            let auth = crate::auth::Auth::build(&ctx).await?;
            let state = roles::auth::build(&ctx, auth);
            roles::auth::run(listener, state, ctx).await
        }
        Role::Entitlements => {
            let auth = crate::auth::Auth::build(&ctx).await?;
            let state = roles::entitlements::build(&ctx, auth).await?;
            roles::entitlements::run(listener, state, ctx).await
        }
        Role::Metrics => {
            let auth = crate::auth::Auth::build(&ctx).await?;
            let state = roles::metrics::build(&ctx, auth);
            roles::metrics::run(listener, state, ctx).await
        }
        Role::Gateway => {
            let auth = crate::auth::Auth::build(&ctx).await?;
            let state = roles::gateway::build(&ctx, auth).await?;
            roles::gateway::run(listener, state, ctx).await
        }
        Role::Stream => {
            let auth = crate::auth::Auth::build(&ctx).await?;
            let state = roles::stream::build(&ctx, auth).await?;
            roles::stream::run(listener, state, ctx).await
        }
    }
}
