//! nginx answering every request with `return 200` and a given body: the ceiling for any HTTP
//! answer on this box, measured by a bench with its own client beside the role it measures.
//! Included by the benches that print a share of it (`#[path]`), not a bench itself.

use std::time::Duration;

/// nginx (one worker) answering every request with `return 200` and `body` (JSON); killed when
/// dropped.
pub struct Nginx {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts it; `None` when nginx is not installed or does not listen within two seconds.
    /// `body` must not hold a single quote (it goes between nginx's quotes).
    pub fn start(body: &str) -> Option<Nginx> {
        assert!(!body.contains('\''), "the body goes between single quotes");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path().display();
        let conf = format!(
            "master_process off;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  client_body_temp_path {d}; proxy_temp_path {d};\n  \
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n  \
             server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; \
             return 200 '{body}'; }} }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Nginx { child, url: format!("http://127.0.0.1:{port}"), _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
