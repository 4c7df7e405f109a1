//! The gateway's upstream HTTP clients: plain HTTP, and TLS (rustls) with the system roots or a CA
//! file per upstream group, an optional client certificate (mTLS), SNI and hostname verification,
//! and HTTP/2 when the upstream offers it by ALPN.
//!
//! Each TLS profile (one per group in `gateway.upstream_tls`, and the default one for every other
//! upstream) has its own connection pool, kept per I/O thread as before ([`crate::server::local`]): a
//! pool's connections carry one profile's identity (its client certificate) and trust, so two
//! groups naming the same host never share a connection made for the other.
//!
//! Verification is never off: there is no key that disables it. A certificate the gateway refuses
//! is a 502 `upstream_unavailable` with reason `upstream_tls` and the certificate problem, from a
//! closed set, in the message ([`upstream_error`]); the full error goes to the log.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::Problem;
use crate::error::{ApiError, ErrorCode};
use crate::server::local::PerThread;

/// TLS to the upstreams of one group (`gateway.upstream_tls.<group>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// A CA bundle (PEM) trusted for this group's upstreams instead of the system's roots (a
    /// private PKI); unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM) presented to upstreams that ask for one (mTLS).
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
    /// The name sent in SNI and verified in the upstream's certificate, instead of the URL's
    /// host (an upstream reached by address, or through a name its certificate does not carry).
    pub server_name: Option<String>,
    /// Offer HTTP/2 by ALPN; an upstream that does not choose it is spoken to in HTTP/1.1.
    pub http2: bool,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
            http2: true,
        }
    }
}

/// The client of one TLS profile.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// A configuration problem of one group's TLS: the field and what is wrong.
type FieldProblem = (&'static str, String);

/// Checks `gateway.upstream_tls` against the groups: every entry names a group with an
/// `https://` upstream, and its files parse (a CA file that does not parse is a start-up error
/// naming the key).
pub fn validate(
    groups: &BTreeMap<String, Vec<Url>>,
    tls: &BTreeMap<String, UpstreamTls>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (group, settings) in tls {
        let key = |field: &str| format!("gateway.upstream_tls.{group}{field}");
        match groups.get(group) {
            None => problems.push(Problem::new(
                key(""),
                format!("no upstream group {group:?} in gateway.upstreams"),
            )),
            Some(urls) if !urls.iter().any(|u| u.scheme() == "https") => problems
                .push(Problem::new(key(""), "set, but no upstream of the group is https://")),
            Some(_) => {}
        }
        if let Err(field_problems) = client_config(settings, &RootCertStore::empty()) {
            problems
                .extend(field_problems.into_iter().map(|(field, m)| Problem::new(key(field), m)));
        }
    }
    problems
}

/// The rustls configuration of one profile: its roots (`ca_file`, else `system`), its client
/// certificate, ring as the provider (as everywhere in the layer), TLS 1.2 and 1.3. ALPN is set
/// by the connector. Every problem is returned with its field (`.ca_file`).
fn client_config(
    tls: &UpstreamTls,
    system: &RootCertStore,
) -> Result<ClientConfig, Vec<FieldProblem>> {
    let mut problems = Vec::new();
    let roots = match &tls.ca_file {
        Some(path) => match ca_roots(path) {
            Ok(roots) => roots,
            Err(e) => {
                problems.push((".ca_file", e));
                RootCertStore::empty()
            }
        },
        None => system.clone(),
    };
    let identity = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert).map_err(|e| (".client_cert_file", e));
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| (".client_key_file", format!("{}: {e}", key.display())));
            match (chain, key) {
                (Ok(chain), Ok(key)) => Some((chain, key)),
                (chain, key) => {
                    problems.extend(chain.err());
                    problems.extend(key.err());
                    None
                }
            }
        }
        (None, None) => None,
        (Some(_), None) => {
            problems.push((".client_key_file", "client_cert_file needs its key".into()));
            None
        }
        (None, Some(_)) => {
            problems.push((".client_cert_file", "client_key_file needs its certificate".into()));
            None
        }
    };
    if let Some(name) = &tls.server_name {
        if ServerName::try_from(name.as_str()).is_err() {
            problems.push((".server_name", format!("{name:?} is not a DNS name or an address")));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![("", e.to_string())])?
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                vec![(".client_key_file", format!("the key does not fit the certificate: {e}"))]
            }
            e => vec![(".client_cert_file", format!("the certificate is not usable: {e}"))],
        }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The certificates of a PEM file; a file with none is refused.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| at(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| at(&e))?;
    if certs.is_empty() {
        return Err(at(&"no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A root store of exactly the certificates of a CA file.
fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set), read once per gateway.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    // A system certificate rustls cannot parse is skipped, as browsers do.
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(role = "gateway", errors = ?found.errors,
            "no system root certificates: https:// upstreams without a ca_file will be refused");
    }
    roots
}

/// A client for one profile, made on the thread that will use it.
fn make_client(
    tls: ClientConfig,
    server_name: Option<ServerName<'static>>,
    http2: bool,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    // The TLS connector takes https:// URLs; plain http:// ones pass through it untouched.
    http.enforce_http(false);
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let builder = match server_name {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
        None => builder,
    };
    let connector = if http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// One client (pool) per TLS profile, each per I/O thread.
pub struct Clients {
    default: PerThread<UpstreamClient>,
    groups: HashMap<String, PerThread<UpstreamClient>>,
}

impl Clients {
    /// The default profile (system roots, HTTP/2 offered) and one per `gateway.upstream_tls`
    /// group; the settings were validated with the configuration.
    pub fn new(tls: &BTreeMap<String, UpstreamTls>) -> Result<Clients, String> {
        let system = system_roots();
        let per_thread = |settings: &UpstreamTls| -> Result<PerThread<UpstreamClient>, String> {
            let config = client_config(settings, &system).map_err(|problems| {
                problems
                    .into_iter()
                    .map(|(f, m)| format!("{f}: {m}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            let name = match &settings.server_name {
                Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| e.to_string())?),
                None => None,
            };
            let http2 = settings.http2;
            let shared = make_client(config.clone(), name.clone(), http2);
            Ok(PerThread::new(shared, move || make_client(config.clone(), name.clone(), http2)))
        };
        let default = per_thread(&UpstreamTls::default())?;
        let mut groups = HashMap::new();
        for (group, settings) in tls {
            groups.insert(group.clone(), per_thread(settings).map_err(|e| format!("{group}{e}"))?);
        }
        Ok(Clients { default, groups })
    }

    /// The client for a route's upstream group (`None`: URLs given on the route itself).
    pub fn get(&self, group: Option<&str>) -> &UpstreamClient {
        group.and_then(|g| self.groups.get(g)).unwrap_or(&self.default).get()
    }

    /// Sends `request` (an absolute URI) to an upstream of `group`. The upstream's name goes in
    /// the URI only: over HTTP/1.1 the client writes it as `Host` (without a default port),
    /// over HTTP/2 as `:authority`, and a `Host` header beside `:authority` is refused by some
    /// servers (nginx answers 400), so any `Host` in the request is removed here.
    pub fn request(
        &self,
        group: Option<&str>,
        mut request: http::Request<Body>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        request.headers_mut().remove(http::header::HOST);
        self.get(group).request(request)
    }
}

/// What went wrong in a TLS handshake with an upstream, as the caller is told it.
fn tls_detail(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "TLS: the upstream's certificate is not valid for its name"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "TLS: the upstream's certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "TLS: the upstream's certificate is not valid yet"
            }
            CertificateError::UnknownIssuer => {
                "TLS: the upstream's certificate is not signed by a trusted CA"
            }
            CertificateError::Revoked => "TLS: the upstream's certificate is revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "TLS: the upstream's certificate is not for server authentication"
            }
            _ => "TLS: the upstream's certificate was refused",
        },
        E::AlertReceived(_) => {
            "TLS: the upstream refused the handshake (did it require a client certificate?)"
        }
        E::NoCertificatesPresented => "TLS: the upstream presented no certificate",
        E::NoApplicationProtocol => "TLS: no application protocol in common with the upstream",
        E::PeerIncompatible(_) => "TLS: no protocol version or cipher in common with the upstream",
        E::InvalidMessage(_) => "TLS: the upstream did not speak TLS",
        _ => "TLS: the handshake with the upstream failed",
    }
}

/// The rustls error behind a client error, if the failure was TLS.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    // An `io::Error` made from another error answers `source()` with that error's own source,
    // skipping it, so the error it wraps is reached through `get_ref` (hyper-rustls wraps the
    // handshake's `io::Error`, itself wrapping the rustls error, in another `io::Error`).
    if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        if let Some(tls) = rustls_error(inner) {
            return Some(tls);
        }
    }
    e.source().and_then(rustls_error)
}

/// Whether a failed call was refused by an HTTP/2 upstream before it processed it: a stream
/// above the last one a graceful `GOAWAY` accepts (nginx sends one after `keepalive_requests`
/// on a connection), or `REFUSED_STREAM`. Such a request may be sent again on a new connection,
/// and says nothing about the upstream's health.
pub fn unprocessed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return (h2.is_go_away()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::NO_ERROR))
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        next = e.source();
    }
    false
}

/// The 502 for a failed upstream call: `upstream_unavailable`, with reason `upstream_tls` and the
/// certificate problem when the TLS handshake failed. The message and the cause are logged.
pub fn upstream_error(e: &hyper_util::client::legacy::Error) -> ApiError {
    let error = ApiError::new(ErrorCode::UpstreamUnavailable, e.to_string())
        .with_source(anyhow::anyhow!("{e:?}"));
    match rustls_error(e) {
        Some(tls) => error.with_reason("upstream_tls").with_public_detail(tls_detail(tls)),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(urls: &[&str]) -> Vec<Url> {
        urls.iter().map(|u| Url::parse(u).unwrap()).collect()
    }

    #[test]
    fn every_problem_names_its_group_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let groups: BTreeMap<String, Vec<Url>> = [
            ("secure".to_string(), group(&["https://a.example"])),
            ("plain".to_string(), group(&["http://b.example"])),
        ]
        .into();
        let tls: BTreeMap<String, UpstreamTls> = [
            (
                "secure".to_string(),
                UpstreamTls {
                    ca_file: Some(junk.clone()),
                    client_cert_file: Some(dir.path().join("missing.pem")),
                    server_name: Some("not a name".into()),
                    ..UpstreamTls::default()
                },
            ),
            ("plain".to_string(), UpstreamTls::default()),
            ("nowhere".to_string(), UpstreamTls::default()),
        ]
        .into();
        let problems = validate(&groups, &tls);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "gateway.upstream_tls.secure.ca_file",
            "gateway.upstream_tls.secure.client_key_file",
            "gateway.upstream_tls.secure.server_name",
            "gateway.upstream_tls.plain",
            "gateway.upstream_tls.nowhere",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {problems:?}");
        }
        let ca = problems.iter().find(|p| p.key.ends_with(".ca_file")).unwrap();
        assert!(ca.message.contains("junk.pem"), "{ca:?}");
        assert_eq!(
            problems[0].env_var().split("__").next(),
            Some("ACCESS_GATEWAY"),
            "{:?}",
            problems[0]
        );
    }

    #[test]
    fn tls_failures_are_found_behind_io_errors_and_named_from_a_closed_set() {
        let refused = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        // As hyper-rustls hands it over: the handshake's io::Error in another one.
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(std::io::Error::other(io));
        let found = rustls_error(boxed.as_ref()).expect("found through the io::Error");
        assert_eq!(tls_detail(found), "TLS: the upstream's certificate is not valid for its name");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(rustls_error(&plain).is_none());
    }
}
