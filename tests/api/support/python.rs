//! Third-party verifiers in Python (PyJWT today), provisioned by the tests themselves: a
//! virtual environment under the target directory, made on first use and reused after,
//! so `cargo test` needs nothing but `python3` on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One environment per package list; made at most once at a time in this process.
static MAKING: Mutex<()> = Mutex::new(());

/// The `python` of a virtual environment with `packages` (pip requirement strings)
/// installed. Panics with what to do when it cannot be made.
pub fn python_with(packages: &[&str]) -> PathBuf {
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let name = packages
        .iter()
        .map(|p| p.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
        .collect::<Vec<_>>()
        .join("-");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("venv-{name}"));
    let python = venv.join("bin").join("python");
    let ready = venv.join(".ready");
    if ready.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv (is python3 with the venv module installed?)",
    );
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
        &format!(
            "pip install {} from the package registry (is PyPI reachable? PIP_INDEX_URL names a mirror)",
            packages.join(" ")
        ),
    );
    std::fs::write(&ready, packages.join("\n")).unwrap();
    python
}

fn run(command: &mut Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
