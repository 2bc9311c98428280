//! The processes the benchmark starts (a private redis-server, authd), what /proc says
//! about them, and about the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed (and reaped) when dropped.
pub struct Owned {
    pub child: Child,
    pub name: &'static str,
}

impl Owned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server of our own on a free port, without persistence, so the shared one is
/// left alone and its CPU can be told apart.
pub fn start_redis(program: &str, dir: &Path) -> anyhow::Result<(Owned, u16)> {
    let port = free_port()?;
    let child = Command::new(program)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {program} (--redis-server)"))?;
    let mut owned = Owned {
        child,
        name: "redis-server",
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        owned.check_alive()?;
        if Instant::now() > deadline {
            bail!("redis-server did not listen on {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((owned, port))
}

/// A Redis Cluster of our own: `primaries` primaries with `replicas` replicas each, on
/// free ports (and their bus ports), created with `redis-cli --cluster create`. Returns
/// the processes (primaries first) and their ports, once every slot is served.
pub fn start_cluster(
    program: &str,
    dir: &Path,
    primaries: usize,
    replicas: usize,
) -> anyhow::Result<(Vec<Owned>, Vec<u16>)> {
    let mut owned = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..primaries * (1 + replicas) {
        let port = loop {
            let port = free_port()?;
            if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                break port;
            }
        };
        let child = Command::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program} (--redis-server)"))?;
        owned.push(Owned {
            child,
            name: "redis-server (cluster)",
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ports.push(port);
    }
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .stdout(Stdio::null())
        .output()
        .context("redis-cli --cluster create")?;
    if !created.status.success() {
        bail!(
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "cluster", "info"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        });
        if ok {
            return Ok((owned, ports));
        }
        if Instant::now() > deadline {
            bail!("the Redis Cluster did not become ok within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the node on `port` is a primary now.
pub fn is_primary(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "role"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("master"))
}

/// The authd binary: `--authd`, or the one built from this workspace next to our own
/// executable (built first, so it is never stale).
pub fn authd_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("bench/ has no parent")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The whole workspace's binaries, so the dependencies are built with the same
    // features as for this program and are not compiled a second time.
    eprintln!("building authd (cargo build --release --workspace --bins)…");
    // Without the CARGO_MANIFEST_DIR that `cargo run` gave this program: ring's build
    // script tracks it, so inheriting it rebuilt ring and all above it on every switch
    // between this build and a build from a shell.
    let status = Command::new(cargo)
        .env_remove("CARGO_MANIFEST_DIR")
        .current_dir(root)
        .args(["build", "--release", "--workspace", "--bins"])
        .status()
        .context("cannot run cargo to build authd; pass --authd PATH")?;
    if !status.success() {
        bail!("cargo build --release --workspace --bins failed");
    }
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("authd");
    if !path.exists() {
        bail!("{} not found; pass --authd PATH", path.display());
    }
    Ok(path)
}

/// Starts authd with exactly `env` (plus PATH), logging to `log`.
pub fn start_authd(
    binary: &Path,
    env: &[(String, String)],
    dir: &Path,
    log: &Path,
) -> anyhow::Result<Owned> {
    let file = std::fs::File::create(log)?;
    let mut command = Command::new(binary);
    command
        .env_clear()
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(Owned {
        child,
        name: "authd",
    })
}

/// This program's path, taken at start: building authd (`authd_binary`) rebuilds this
/// executable too, after which `current_exe` names a deleted file (the path then runs
/// the rebuilt program, the same code).
pub static OWN_EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// This program again as the reference server (`--serve-reference`); its address once
/// it listens. `env` is what authd-bench's `--env` gave authd (Tokio's settings, say),
/// so that the reference runs as authd does. Blocks until the child listens.
pub fn start_reference(
    args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<(Owned, String)> {
    use std::io::BufRead;
    let exe = OWN_EXE
        .get()
        .context("own executable not recorded at start")?;
    let mut child = Command::new(exe)
        .arg("--serve-reference")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the reference server")?;
    let stdout = child.stdout.take().context("reference server: no stdout")?;
    let owned = Owned {
        child,
        name: "reference server",
    };
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("reference server did not start (it said {line:?})"))?
        .to_owned();
    Ok((owned, addr))
}

/// The last lines of a log, for an error message.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// User + system CPU time of a process so far, in µs (`None` when it cannot be read).
pub fn cpu_micros(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The 1-minute load average.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// The CPU model, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// CPU used by authd, redis and the load generator across a scenario.
#[derive(Clone, Copy, Default)]
pub struct CpuMark {
    authd: Option<u64>,
    redis: Option<u64>,
    bench: Option<u64>,
}

impl CpuMark {
    pub fn now(authd: Option<u32>, redis: Option<u32>) -> Self {
        Self {
            authd: authd.and_then(|p| cpu_micros(Some(p))),
            redis: redis.and_then(|p| cpu_micros(Some(p))),
            bench: cpu_micros(None),
        }
    }

    /// µs of CPU per call since `self`, for authd, redis and the generator.
    pub fn per_call(&self, later: &Self, calls: u64) -> [Option<f64>; 3] {
        let per = |a: Option<u64>, b: Option<u64>| {
            Some(b?.saturating_sub(a?) as f64 / calls.max(1) as f64)
        };
        [
            per(self.authd, later.authd),
            per(self.redis, later.redis),
            per(self.bench, later.bench),
        ]
    }
}
