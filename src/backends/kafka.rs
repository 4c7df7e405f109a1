//! Kafka through rskafka, with TLS (rustls; system roots plus an optional CA file) and SASL.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::BackoffConfig;

use super::{BackendError, CheckError};
use crate::config::{KafkaConfig, SaslMechanism};

/// Connects to the first bootstrap broker that answers, giving up after `timeout`.
pub async fn connect(
    bootstrap: &[String],
    config: &KafkaConfig,
    timeout: Duration,
) -> Result<Arc<Client>, BackendError> {
    let target = bootstrap.join(",");
    let err = |m: &dyn std::fmt::Display| BackendError::new("kafka", target.clone(), m);
    let backoff = BackoffConfig {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(2),
        base: 2.0,
        deadline: Some(timeout),
    };
    let mut builder = ClientBuilder::new(bootstrap.to_vec())
        .client_id(config.client_id.clone())
        .backoff_config(backoff);
    if config.tls {
        builder = builder.tls_config(tls_config(config).map_err(|e| err(&e))?);
    }
    if let (Some(mechanism), Some(user), Some(password)) =
        (config.sasl_mechanism, &config.sasl_username, &config.sasl_password)
    {
        let credentials = Credentials::new(user.clone(), password.expose().to_string());
        builder = builder.sasl_config(match mechanism {
            SaslMechanism::Plain => SaslConfig::Plain(credentials),
            SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(credentials),
            SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(credentials),
        });
    }
    // The backoff deadline bounds retries; this bounds a broker that accepts and never answers.
    match tokio::time::timeout(timeout + Duration::from_secs(1), builder.build()).await {
        Ok(Ok(client)) => Ok(Arc::new(client)),
        Ok(Err(e)) => Err(err(&e)),
        Err(_) => Err(err(&format!("no answer within {timeout:?}"))),
    }
}

fn tls_config(config: &KafkaConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.ca_file {
        for cert in
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// A readiness check: the broker answers a metadata request.
pub fn ready_check(
    client: Arc<Client>,
) -> impl Fn() -> BoxFuture<'static, Result<(), CheckError>> + Send + Sync {
    move || {
        let client = client.clone();
        Box::pin(async move {
            client.list_topics().await.map(|_| ()).map_err(|e| CheckError::failed("kafka", e))
        })
    }
}
