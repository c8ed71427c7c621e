//! The real server and how to talk to it: start the patched `mistralrs`
//! binary of this workspace (`target/debug/mistralrs`) on the real model
//! ([`Server`], killed on drop) or attach to one already running, send it
//! chat and completion requests over a minimal loopback HTTP/1.1 client
//! ([`http`], [`Completion`]), and read the backends' release records
//! (`omnikv_backend::accounting`) from its log ([`StoreRelease`],
//! [`EvictRelease`]). The tools (`omnikv-eval`,
//! `omnikv-bench`, `omnikv-calibrate`, `omnikv-soak`) and the end-to-end
//! tests share it.
//!
//! It expects `scripts/prepare-host.sh`, `scripts/fetch-model.sh` and
//! `cargo build --workspace` to have run (`make build` does all three).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use omnikv_backend::accounting::ReleaseRecord;
use omnikv_backend::BACKEND_NAME;
use serde_json::Value;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

pub fn model_dir() -> PathBuf {
    root().join("models/smollm2")
}

/// The `mistralrs` binary built in this workspace's target directory.
pub fn mistralrs_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bin = target.join("debug").join("mistralrs");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mistralrs-cli` (or `make test`) first",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Arguments that select the real model, as in the fixture's command.
pub fn model_args() -> Vec<String> {
    assert!(
        model_dir().join(MODEL_FILE).exists(),
        "the model is missing: run scripts/fetch-model.sh (or `make test`) first"
    );
    vec![
        "--format".into(),
        "gguf".into(),
        "-m".into(),
        model_dir().display().to_string(),
        "-f".into(),
        MODEL_FILE.into(),
    ]
}

/// A running `mistralrs serve` process, killed on drop.
pub struct Server {
    /// `None` for a server this process attached to ([`Server::attach`]).
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Server {
    /// Start `mistralrs serve` with `--kv-cache <backend>` and extra args, and
    /// wait until it answers HTTP.
    pub fn start(backend: &str, extra: &[&str]) -> Result<Server> {
        Self::start_model(backend, extra, &model_args())
    }

    /// Like [`Server::start`] with explicit model arguments.
    pub fn start_model(backend: &str, extra: &[&str], model: &[String]) -> Result<Server> {
        Self::start_model_env(backend, extra, model, &[])
    }

    /// `mistralrs serve -p <free port> <args>`; waits until it answers HTTP
    /// on the loopback interface.
    pub fn start_args(label: &str, args: &[String]) -> Result<Server> {
        Self::start_args_env(label, args, &[])
    }

    /// [`Server::start_model`] with extra environment variables for the
    /// server process (e.g. `RUST_BACKTRACE`).
    pub fn start_model_env(
        backend: &str,
        extra: &[&str],
        model: &[String],
        env: &[(&str, &str)],
    ) -> Result<Server> {
        let mut args: Vec<String> = vec!["--host".into(), "127.0.0.1".into()];
        args.extend(["--kv-cache".to_string(), backend.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(model.iter().cloned());
        Self::start_args_env(backend, &args, env)
    }

    /// [`Server::start_args`] with extra environment variables.
    pub fn start_args_env(label: &str, args: &[String], env: &[(&str, &str)]) -> Result<Server> {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("omnikv-it-{label}-{port}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(mistralrs_bin());
        cmd.arg("serve")
            .args(["-p", &port.to_string()])
            .args(args)
            .current_dir(root())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd.spawn().context("spawn mistralrs")?;
        let mut server = Server {
            child: Some(child),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = server.child.as_mut().expect("spawned").try_wait()? {
                bail!("mistralrs exited early ({status}):\n{}", server.log_tail());
            }
            if let Ok((200, _)) = server.get("/v1/models") {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("mistralrs did not come up in time:\n{}", server.log_tail());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A server already running on `127.0.0.1:port` (started by someone
    /// else; left running when dropped). Its log is not available.
    pub fn attach(port: u16) -> Result<Server> {
        let server = Server {
            child: None,
            port,
            log: std::env::temp_dir().join(format!("omnikv-attached-{port}.log")),
        };
        match server.get("/v1/models") {
            Ok((200, _)) => Ok(server),
            Ok((status, body)) => {
                bail!("127.0.0.1:{port} answered /v1/models with {status}: {body}")
            }
            Err(e) => bail!("no server answers on 127.0.0.1:{port}: {e}"),
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the server's log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .map(|t| t.contains(needle))
            .unwrap_or(false)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The server's process id (panics for an attached server).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("an attached server has no child process")
            .id()
    }

    /// Resident set size of the server process, in KiB (Linux).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")
    }

    /// The `omnikv` backend's release records so far (one per sequence the
    /// host dropped, the start-up dummy run included).
    pub fn store_releases(&self) -> Vec<StoreRelease> {
        self.log_lines(StoreRelease::parse)
    }

    /// Wait until the log shows `count` releases; returns them.
    pub fn wait_for_releases(&self, count: usize, timeout: Duration) -> Result<Vec<StoreRelease>> {
        self.wait_for_lines(count, timeout, "store releases", StoreRelease::parse)
    }

    /// The log lines `parse` recognises, parsed.
    fn log_lines<T>(&self, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(parse)
            .collect()
    }

    /// Wait until the log has `count` lines that `parse` recognises.
    fn wait_for_lines<T>(
        &self,
        count: usize,
        timeout: Duration,
        what: &str,
        parse: impl Fn(&str) -> Option<T> + Copy,
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.log_lines(parse);
            if r.len() >= count {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} {what} logged, expected {count}:\n{}",
                    r.len(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http(self.port, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, String)> {
        http(self.port, "POST", path, Some(&body.to_string()))
    }

    /// A greedy chat completion of one user message, as in the fixture.
    pub fn chat(&self, prompt: &str, max_tokens: usize) -> Result<Completion> {
        self.chat_request(&Self::chat_body(prompt, max_tokens))
    }

    fn chat_body(prompt: &str, max_tokens: usize) -> Value {
        serde_json::json!({
            "model": "default",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": max_tokens,
        })
    }

    /// A greedy raw-text completion (`/v1/completions`, no chat template).
    pub fn complete(&self, prompt: &str, max_tokens: usize) -> Result<Completion> {
        self.completion(
            "/v1/completions",
            &Self::completion_body(prompt, max_tokens),
            "/text",
        )
    }

    fn completion_body(prompt: &str, max_tokens: usize) -> Value {
        serde_json::json!({
            "model": "default",
            "prompt": prompt,
            "temperature": 0.0,
            "max_tokens": max_tokens,
        })
    }

    /// POST `body` to `path` and read the first choice's text (at JSON
    /// pointer `text` below `choices/0`) and the usage figures.
    fn completion(&self, path: &str, body: &Value, text: &str) -> Result<Completion> {
        let (status, resp) = self.post(path, body)?;
        if status != 200 {
            bail!("HTTP {status}: {resp}");
        }
        let v: Value = serde_json::from_str(&resp).with_context(|| format!("response: {resp}"))?;
        let usage = |key: &str| &v["usage"][key];
        Ok(Completion {
            text: v["choices"][0]
                .pointer(text)
                .and_then(Value::as_str)
                .with_context(|| format!("no {text} in the response: {resp}"))?
                .to_string(),
            prompt_tokens: usage("prompt_tokens").as_u64().unwrap_or(0) as usize,
            completion_tokens: usage("completion_tokens").as_u64().unwrap_or(0) as usize,
            prompt_time_sec: usage("total_prompt_time_sec").as_f64().unwrap_or(0.0),
            completion_time_sec: usage("total_completion_time_sec").as_f64().unwrap_or(0.0),
        })
    }

    /// A case as its prompt mode sends it.
    pub fn ask(&self, case: &crate::eval::Case) -> Result<Completion> {
        self.ask_with(case, None)
    }

    /// A case as its prompt mode sends it, with the request's `kv_cache`
    /// options (`None`: the field is left out).
    ///
    /// # Errors
    /// A failed connection, a status other than 200, or a response without
    /// the first choice's text.
    pub fn ask_with(
        &self,
        case: &crate::eval::Case,
        kv_cache: Option<&Value>,
    ) -> Result<Completion> {
        let plain = case.mode == crate::eval::PromptMode::Plain;
        let mut body = if plain {
            Self::completion_body(&case.prompt, case.max_tokens)
        } else {
            Self::chat_body(&case.prompt, case.max_tokens)
        };
        if let Some(opts) = kv_cache {
            body["kv_cache"] = opts.clone();
        }
        if plain {
            self.completion("/v1/completions", &body, "/text")
        } else {
            self.chat_request(&body)
        }
    }

    /// A chat completion with a body of the caller's choosing.
    pub fn chat_request(&self, body: &Value) -> Result<Completion> {
        self.completion("/v1/chat/completions", body, "/message/content")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an `omnikv` backend released for one sequence: its
/// [`ReleaseRecord`] (the backend's accounting API, one JSON object per log
/// line), in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreRelease {
    pub seq: usize,
    /// Bytes the sequence held in the host and device tiers.
    pub held_host: u64,
    pub held_device: u64,
    /// Sequences still holding rows after the release, and their bytes.
    pub remaining: usize,
    pub remaining_host: u64,
    pub remaining_device: u64,
    /// Bytes of window-selector queries the sequence held, and those of the
    /// sequences still live (`uniform`, `exp`).
    pub held_queries: u64,
    pub remaining_queries: u64,
}

impl StoreRelease {
    /// The `omnikv` release record on a log line, if any.
    pub fn parse(line: &str) -> Option<Self> {
        let r = ReleaseRecord::from_log_line(line).filter(|r| r.backend == BACKEND_NAME)?;
        Some(Self {
            seq: r.seq,
            held_host: r.held_host_bytes,
            held_device: r.held_device_bytes,
            remaining: r.live,
            remaining_host: r.live_host_bytes,
            remaining_device: r.live_device_bytes,
            held_queries: r.held_query_bytes,
            remaining_queries: r.live_query_bytes,
        })
    }

    /// Nothing is held by any sequence after this release.
    pub fn store_empty(&self) -> bool {
        self.remaining == 0
            && self.remaining_host == 0
            && self.remaining_device == 0
            && self.remaining_queries == 0
    }
}

/// What a token-dropping backend (`h2o`, `streaming`, `snapkv`) released for
/// one sequence: its [`ReleaseRecord`] with the row counts these backends
/// report.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictRelease {
    pub backend: String,
    pub seq: usize,
    /// Rows (positions x layers x KV heads) the sequence held at the end.
    pub rows: u64,
    pub bytes: u64,
    pub peak_rows: u64,
    pub peak_bytes: u64,
    /// Positions the sequence saw, and the rows a cache that keeps every
    /// position (the stock cache) holds for them.
    pub positions: u64,
    pub full_rows: u64,
    pub live: usize,
}

impl EvictRelease {
    /// A baseline's release record on a log line, if any.
    pub fn parse(line: &str) -> Option<Self> {
        let r = ReleaseRecord::from_log_line(line).filter(|r| r.backend != BACKEND_NAME)?;
        Some(Self {
            rows: r.rows?,
            bytes: r.held_host_bytes,
            peak_rows: r.peak_rows?,
            peak_bytes: r.peak_bytes?,
            positions: r.positions?,
            full_rows: r.full_rows?,
            live: r.live,
            seq: r.seq,
            backend: r.backend,
        })
    }
}

impl Server {
    /// The eviction backends' release lines so far.
    pub fn evict_releases(&self) -> Vec<EvictRelease> {
        self.log_lines(EvictRelease::parse)
    }

    /// Wait until the log shows `count` eviction-backend releases.
    pub fn wait_for_evict_releases(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<EvictRelease>> {
        self.wait_for_lines(count, timeout, "releases", EvictRelease::parse)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Time the server spent on the prompt (its `usage.total_prompt_time_sec`).
    pub prompt_time_sec: f64,
    /// Time the server spent generating (`usage.total_completion_time_sec`).
    pub completion_time_sec: f64,
}

/// Minimal HTTP/1.1 client (loopback only): one request per connection.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(1800)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        } else if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out)?;
    } else {
        r.read_to_end(&mut out)?;
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}
