//! The built `access` binary: exit codes and messages an operator sees.

use std::process::Command;

fn access() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_access"));
    // Only what the test sets: no ACCESS_* from the developer's shell.
    c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

#[test]
fn check_config_names_the_bad_key_and_exits_64() {
    let out = access()
        .args(["check-config"])
        .env("ACCESS_GATEWAY__PORT", "eighty")
        .env("ACCESS_ENV", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway.port (ACCESS_GATEWAY__PORT)"), "{err}");
}

/// Every wrong type and every semantic problem in one run, each with its key and variable: a
/// value of the wrong type no longer hides the others, nor the semantic checks.
#[test]
fn check_config_reports_every_problem_in_one_run() {
    let out = access()
        .args(["check-config"])
        .env("ACCESS_SERVER__MAX_BODY_BYTES", "lots")
        .env("ACCESS_SERVER__GRACE_PERIOD", "soon")
        .env("ACCESS_GATEWAY__BREAKER__ERROR_RATE", "2")
        .env("ACCESS_GATEWAY__TIMEOUT", "later")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "server.max_body_bytes (ACCESS_SERVER__MAX_BODY_BYTES)",
        "server.grace_period (ACCESS_SERVER__GRACE_PERIOD)",
        "gateway.breaker.error_rate (ACCESS_GATEWAY__BREAKER__ERROR_RATE)",
        "gateway.timeout (ACCESS_GATEWAY__TIMEOUT)",
    ] {
        assert!(err.contains(expected), "{expected} missing:\n{err}");
    }
    assert!(err.contains("configuration has 4 problem(s)"), "{err}");
}

#[test]
fn check_config_accepts_a_good_config() {
    let out = access().args(["check-config"]).env("ACCESS_LOG_LEVEL", "debug").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn print_config_redacts_secrets() {
    let out = access()
        .args(["print-config"])
        .env("ACCESS_REDIS_URL", "redis://:topsecret@cache:6379")
        .env("ACCESS_POSTGRES_DSN", "postgres://u:alsosecret@db/access")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("topsecret") && !text.contains("alsosecret"), "{text}");
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["redis_url"], "redis://:***@cache:6379");
    assert_eq!(parsed["gateway"]["port"], 8000);
}

#[test]
fn version_is_printed() {
    let out = access().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("access {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A free local port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `make run` (scripts/run.sh) started as a terminal starts it, in a process group of its own,
/// and stopped with Ctrl-C (SIGINT to the whole group): the layer shuts down cleanly and the
/// script exits 0, so make reports no error.
#[test]
fn make_run_exits_0_after_ctrl_c() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dev-key.json").display().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run.sh");
    // As at a terminal, SIGINT starts with its default action (a test runner started in the
    // background may have it ignored, and bash cannot trap a signal ignored on entry).
    let mut cmd = std::process::Command::new("env");
    cmd.arg("--default-signal=INT").arg("bash");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("ACCESS_AUTH__DEV_KEY_FILE", &key)
        .env("ACCESS_SERVER__GRACE_PERIOD", "0s")
        .env("ACCESS_LOG_LEVEL", "warn")
        .env("SAMPLE_UPSTREAM_PORT", free_port().to_string())
        .args([script, env!("CARGO_BIN_EXE_access")])
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut ports = Vec::new();
    for role in ["GATEWAY", "STREAM", "AUTH", "ENTITLEMENTS", "METRICS"] {
        let port = free_port();
        ports.push(port);
        cmd.env(format!("ACCESS_{role}__PORT"), port.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines().map_while(Result::ok);
    assert!(
        lines.by_ref().any(|l| l.contains("runs every role in one process")),
        "the script announces the running layer"
    );
    // The operator's console: its link, and the sign-in code the layer wrote to its file.
    let console = format!("http://localhost:{}/console/", ports[2]);
    assert!(lines.by_ref().any(|l| l.trim() == console), "the script prints {console}");
    let code_line = lines.by_ref().find(|l| l.contains("sign-in code:")).unwrap_or_default();
    let code_file = dir.path().join(".local/share/access/console-code");
    let code = std::fs::read_to_string(&code_file).unwrap_or_default();
    assert!(
        !code.trim().is_empty() && code_line.contains(code.trim()),
        "the script prints the code in {}: {code_line:?}",
        code_file.display()
    );
    // Once every role listens (its signal handler is installed by then: a SIGINT before that
    // would end the process by default, on a loaded machine too)...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for port in &ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "port {port} never opened");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    // ...Ctrl-C at a terminal: SIGINT to every process of the foreground group.
    let pgid = child.id();
    let sent = Command::new("kill").args(["-INT", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "run.sh did not end after Ctrl-C");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "run.sh: {status:?}\n{stderr}");
}
