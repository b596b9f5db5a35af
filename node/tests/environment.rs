//! How the `chorus` binary reads its environment.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

fn chorus_token(var: &str, value: &[u8]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["token", "--user", "alice"])
        .env(var, OsStr::from_bytes(value))
        .output()
        .expect("run chorus token")
}

#[test]
fn a_variable_that_is_not_utf8_is_ignored_unless_it_is_ours() {
    // This panicked (exit 101) before any config was read: `std::env::vars`
    // refuses the whole environment for one non-UTF-8 value.
    let out = chorus_token("LEGACY_LATIN1_NAME", b"Jos\xe9");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches('.').count(), 2);

    let out = chorus_token("CHORUS_AUTH_JWT_SECRET", b"\xff\xfe");
    assert_eq!(out.status.code(), Some(1), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CHORUS_AUTH_JWT_SECRET is not UTF-8"),
        "{stderr}"
    );
}
