//! TLS to upstreams against a real nginx, with certificates made by `openssl` in the test: an
//! HTTPS upstream (HTTP/2 by ALPN, or HTTP/1.1 when the group does not offer it), an mTLS
//! upstream with and without the gateway's client certificate, a certificate for another name,
//! one from an untrusted CA, and the server-name override; and the start-up errors of files that
//! do not parse.

use std::time::Duration;

use access::config::Sources;
use access::role::Role;
use serde_json::Value;

use crate::support::{closed_port, config_with_file, eventually, http, start, wait_ready, DevKeys};

/// A CA, a server certificate for `localhost` signed by it, a client certificate signed by it,
/// and a second CA nobody trusts with a server certificate of its own; all made by `openssl`.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs { dir };
        certs.ca("ca");
        certs.ca("rogue-ca");
        certs.leaf("server", "ca", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth");
        certs.leaf("client", "ca", "extendedKeyUsage=clientAuth");
        certs.leaf(
            "rogue",
            "rogue-ca",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        certs
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=access test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
    }

    /// A certificate `name` (`<name>.crt`, `<name>.key`) signed by the CA `ca`, with
    /// `extensions` (openssl extension lines).
    pub fn leaf(&self, name: &str, ca: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.path().join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{extensions}\n"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=access test {name}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &ext,
        ]);
    }
}

/// A private nginx (one process, no daemon), killed when dropped.
pub struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `servers` (server blocks) in its `http` block, waiting for `ports`.
    pub async fn start(servers: &str, ports: &[u16]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d};\n  \
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n{servers}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nginx is installed (tests/services.sh installs it)");
        let nginx = Nginx { child, _dir: dir };
        for &port in ports {
            eventually(Duration::from_secs(5), "nginx listens", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
            })
            .await;
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx answers what it saw of the connection: protocol, TLS version, client certificate, SNI.
const ECHO: &str = r#"default_type application/json;
      return 200 '{"protocol":"$server_protocol","tls":"$ssl_protocol","client":"$ssl_client_s_dn","sni":"$ssl_server_name","host":"$host"}';"#;

fn servers(certs: &Certs, https: u16, mtls: u16, rogue: u16) -> String {
    let (crt, key, ca) = (certs.path("server.crt"), certs.path("server.key"), certs.path("ca.crt"));
    let (rogue_crt, rogue_key) = (certs.path("rogue.crt"), certs.path("rogue.key"));
    format!(
        r#"
  server {{
    listen 127.0.0.1:{https} ssl http2;
    ssl_certificate {crt}; ssl_certificate_key {key};
    location / {{ {ECHO} }}
  }}
  server {{
    listen 127.0.0.1:{mtls} ssl http2;
    ssl_certificate {crt}; ssl_certificate_key {key};
    ssl_client_certificate {ca}; ssl_verify_client on;
    location / {{ {ECHO} }}
  }}
  server {{
    listen 127.0.0.1:{rogue} ssl;
    ssl_certificate {rogue_crt}; ssl_certificate_key {rogue_key};
    location / {{ {ECHO} }}
  }}
"#
    )
}

fn route(name: &str) -> String {
    format!(
        "- {{ name: {name}, path: \"/g/{name}/{{*rest}}\", upstream: {name}, strip_prefix: /g/{name}, auth: none, retries: 0 }}\n"
    )
}

/// A gateway (in this process) with `toml` and the route file `routes`, ready.
async fn gateway(toml: &str, routes: &std::path::Path, keys: &DevKeys) -> crate::support::Running {
    let routes = routes.display().to_string();
    let env = [
        ("ACCESS_AUTH__DEV_KEY_FILE", keys.path.as_str()),
        ("ACCESS_GATEWAY__ROUTES_FILE", &routes),
    ];
    let g = start(Role::Gateway, config_with_file(toml, &env)).await;
    wait_ready(&g.url("")).await;
    g
}

async fn get(url: &str) -> (u16, Value, String) {
    let r = http().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

#[tokio::test]
async fn https_and_mtls_upstreams_are_verified_and_spoken_to_in_http2_when_offered() {
    let certs = Certs::new();
    let (https, mtls, rogue) = (closed_port().await, closed_port().await, closed_port().await);
    let _nginx = Nginx::start(&servers(&certs, https, mtls, rogue), &[https, mtls, rogue]).await;
    let dir = tempfile::tempdir().unwrap();
    let groups = [
        "h2",
        "h1",
        "mtls",
        "mtls_no_cert",
        "mtls_wrong_cert",
        "wrong_name",
        "by_address",
        "untrusted",
        "rogue",
    ];
    let routes: String = groups.iter().map(|g| route(g)).collect();
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    let (ca, client_crt, client_key) =
        (certs.path("ca.crt"), certs.path("client.crt"), certs.path("client.key"));
    let toml = format!(
        r#"
[gateway.upstreams]
h2 = ["https://localhost:{https}"]
h1 = ["https://localhost:{https}"]
mtls = ["https://localhost:{mtls}"]
mtls_no_cert = ["https://localhost:{mtls}"]
mtls_wrong_cert = ["https://localhost:{mtls}"]
wrong_name = ["https://127.0.0.1:{https}"]
by_address = ["https://127.0.0.1:{https}"]
untrusted = ["https://localhost:{https}"]
rogue = ["https://localhost:{rogue}"]
[gateway.upstream_tls.h2]
ca_file = "{ca}"
[gateway.upstream_tls.h1]
ca_file = "{ca}"
http2 = false
[gateway.upstream_tls.mtls]
ca_file = "{ca}"
client_cert_file = "{client_crt}"
client_key_file = "{client_key}"
[gateway.upstream_tls.mtls_no_cert]
ca_file = "{ca}"
[gateway.upstream_tls.mtls_wrong_cert]
ca_file = "{ca}"
client_cert_file = "{rogue_crt}"
client_key_file = "{rogue_key}"
[gateway.upstream_tls.wrong_name]
ca_file = "{ca}"
[gateway.upstream_tls.by_address]
ca_file = "{ca}"
server_name = "localhost"
[gateway.upstream_tls.rogue]
ca_file = "{ca}"
"#,
        rogue_crt = certs.path("rogue.crt"),
        rogue_key = certs.path("rogue.key"),
    );
    let keys = DevKeys::new();
    let g = gateway(&toml, &routes_file, &keys).await;

    // HTTPS, verified against the group's CA, HTTP/2 chosen by ALPN.
    let (status, body, text) = get(&g.url("/g/h2/x")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(body["protocol"], "HTTP/2.0", "{body}");
    assert_eq!(body["sni"], "localhost", "SNI is the URL's host");
    assert_eq!(body["host"], "localhost");
    // The same upstream in HTTP/1.1 when the group does not offer HTTP/2; a second request
    // reuses the pooled connection.
    for _ in 0..2 {
        let (status, body, text) = get(&g.url("/g/h1/x")).await;
        assert_eq!((status, body["protocol"].as_str()), (200, Some("HTTP/1.1")), "{text}");
    }
    // mTLS: the client certificate is presented...
    let (status, body, text) = get(&g.url("/g/mtls/x")).await;
    assert_eq!(status, 200, "{text}");
    assert!(body["client"].as_str().unwrap().contains("access test client"), "{body}");
    // ...and nginx refuses a gateway without it, or with one from another CA (it answers 400
    // after the handshake, which the gateway passes on as the upstream's answer).
    for group in ["mtls_no_cert", "mtls_wrong_cert"] {
        let (status, _, text) = get(&g.url(&format!("/g/{group}/x"))).await;
        assert_eq!(status, 400, "{group}: {text}");
        assert!(text.contains("SSL certificate"), "{group}: nginx says why: {text}");
    }
    // An upstream reached by an address its certificate does not name is refused, with a clear
    // reason; the server-name override makes the same address work.
    let (status, body, text) = get(&g.url("/g/wrong_name/x")).await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str(), body["side"].as_str()),
        (Some("upstream_unavailable"), Some("upstream_tls"), Some("upstream")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("not valid for its name"), "{body}");
    let (status, body, text) = get(&g.url("/g/by_address/x")).await;
    assert_eq!((status, body["sni"].as_str()), (200, Some("localhost")), "{text}");
    // A certificate from a CA the group does not trust: the system's roots (no ca_file) do not
    // know the test CA, and the group's CA did not sign the rogue server's certificate.
    for group in ["untrusted", "rogue"] {
        let (status, body, text) = get(&g.url(&format!("/g/{group}/x"))).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (502, Some("upstream_tls")),
            "{group}: {text}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("not signed by a trusted CA"),
            "{group}: {body}"
        );
        assert!(!text.contains(&certs.path("")), "no file path in the body: {text}");
    }
}

#[tokio::test]
async fn tls_files_that_do_not_parse_are_start_up_errors_naming_their_keys() {
    let certs = Certs::new();
    let junk = certs.dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        .unwrap();
    let toml = format!(
        r#"
[gateway.upstreams]
secure = ["https://upstream.example"]
[gateway.upstream_tls.secure]
ca_file = "{junk}"
client_cert_file = "{crt}"
client_key_file = "{wrong_key}"
"#,
        junk = junk.display(),
        crt = certs.path("client.crt"),
        wrong_key = certs.path("server.key"),
    );
    let problems = load_problems(&toml);
    assert!(
        problems.iter().any(|(key, var, message)| key == "gateway.upstream_tls.secure.ca_file"
            && var == "ACCESS_GATEWAY__UPSTREAM_TLS__SECURE__CA_FILE"
            && message.contains("junk.pem")),
        "{problems:?}"
    );
    // The certificate parses, the key parses, but they are not a pair.
    let toml = toml.replace(&junk.display().to_string(), &certs.path("ca.crt"));
    let problems = load_problems(&toml);
    assert!(
        problems.iter().any(|(key, _, m)| key == "gateway.upstream_tls.secure.client_key_file"
            && m.contains("does not fit")),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    // Settings for a group that is not there, or that has no https:// upstream, are refused
    // rather than ignored.
    let problems = load_problems(
        "[gateway.upstreams]\nplain = [\"http://a.example\"]\n[gateway.upstream_tls.plain]\n[gateway.upstream_tls.nothing]\n",
    );
    let keys: Vec<&str> = problems.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["gateway.upstream_tls.nothing", "gateway.upstream_tls.plain"],
        "{problems:?}"
    );
}

fn load_problems(toml: &str) -> Vec<(String, String, String)> {
    let file = write_toml(toml);
    let sources = Sources { file: Some(file.path().to_path_buf()), ..Sources::default() };
    // The built-in routes name groups these files leave out; only TLS problems are of interest.
    match access::roles::load(&sources) {
        Ok(_) => panic!("loaded:\n{toml}"),
        Err(e) => {
            e.0.iter()
                .filter(|p| p.key.starts_with("gateway.upstream_tls"))
                .map(|p| (p.key.clone(), p.env_var(), p.message.clone()))
                .collect()
        }
    }
}

fn write_toml(toml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, toml.as_bytes()).unwrap();
    file
}

/// An HTTP/2 upstream that rotates its connections (nginx sends a graceful `GOAWAY` after
/// `keepalive_requests`, here 100) while many requests are in flight on them: the streams it
/// refuses unprocessed are sent again on a new connection, so no client sees a 502, and the
/// upstream's breaker does not count them as failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_rotating_its_connections_under_load_costs_no_request() {
    let certs = Certs::new();
    let port = closed_port().await;
    let (crt, key, ca) = (certs.path("server.crt"), certs.path("server.key"), certs.path("ca.crt"));
    let server = format!(
        r#"
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {crt}; ssl_certificate_key {key};
    keepalive_requests 100;
    location / {{ {ECHO} }}
  }}
"#
    );
    let _nginx = Nginx::start(&server, &[port]).await;
    let dir = tempfile::tempdir().unwrap();
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, route("h2")).unwrap();
    let toml = format!(
        "[gateway.upstreams]\nh2 = [\"https://localhost:{port}\"]\n[gateway.upstream_tls.h2]\nca_file = \"{ca}\"\n\
         [gateway.rate_limits.public]\nrate = 1000000\nperiod = \"1s\"\nburst = 1000000\n"
    );
    let keys = DevKeys::new();
    let g = gateway(&toml, &routes_file, &keys).await;
    let client = reqwest::Client::new();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..20 {
        // 30 at once (not a divisor of 100): streams are in flight past the 100th when nginx
        // says GOAWAY.
        let batch = (0..30).map(|_| {
            let request = client.get(g.url("/g/h2/x")).send();
            async move {
                let r = request.await.unwrap();
                let status = r.status().as_u16();
                (status, r.text().await.unwrap())
            }
        });
        for (status, text) in futures::future::join_all(batch).await {
            if status != 200 {
                eprintln!("{status}: {text}");
            }
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    assert_eq!(statuses, [(200, 600)].into(), "every request answered");
    let (status, body, text) = get(&g.url("/g/h2/x")).await;
    assert_eq!((status, body["protocol"].as_str()), (200, Some("HTTP/2.0")), "{text}");
    let breakers: Value = http()
        .get(g.url("/api/v1/circuit-breakers"))
        .bearer_auth(keys.token("root", "t0", &["admin"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let breakers = breakers["circuit_breakers"].as_array().unwrap();
    assert_eq!(breakers.len(), 1, "{breakers:?}");
    assert_eq!(
        (breakers[0]["state"].as_str(), breakers[0]["times_opened"].as_u64()),
        (Some("closed"), Some(0)),
        "refused streams are not failures: the breaker never opened"
    );
}
