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
