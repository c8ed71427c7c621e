//! Tensor parallelism over the host's ring backend: two real `mistralrs`
//! processes on 127.0.0.1 (rank 0 serves HTTP, rank 1 replays its
//! requests), the tiny random Llama-3.1 checkpoint (4 query heads and 2 KV
//! heads: 2 and 1 per rank), greedy outputs equal to
//! one process for the stock cache and for `omnikv` at a budget that selects
//! (offload off and on), both ranks selecting the same rows, and concurrent
//! requests served one at a time without hanging the ring. GGUF under
//! tensor parallelism is refused at start with the way out.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::{
    mistralrs_bin, model_args, root, serial, tiny_model_args, tiny_prompts, Server,
};

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `RING_CONFIG` files of a ring of `n` ranks on 127.0.0.1 (every
/// listener on the loopback interface).
fn ring_of(tag: &str, n: usize) -> Vec<PathBuf> {
    let master = free_port();
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (0..n)
        .map(|rank| {
            let cfg = serde_json::json!({
                "master_ip": "127.0.0.1", "master_port": master,
                "port": ports[rank], "right_port": ports[(rank + 1) % n],
                "right_ip": "127.0.0.1", "listen_ip": "127.0.0.1",
                "rank": rank, "world_size": n
            });
            let path = std::env::temp_dir().join(format!(
                "omnikv-ring-{tag}-{}-rank{rank}.json",
                std::process::id()
            ));
            std::fs::write(&path, cfg.to_string()).unwrap();
            path
        })
        .collect()
}

/// The two ranks' `RING_CONFIG` files.
fn ring_configs(tag: &str) -> [PathBuf; 2] {
    let mut paths = ring_of(tag, 2);
    let rank1 = paths.pop().unwrap();
    [paths.pop().unwrap(), rank1]
}

/// Rank 1 (a daemon: no HTTP), killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &[String], ring_config: &PathBuf) -> Daemon {
        let log = ring_config.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(mistralrs_bin())
            .arg("serve")
            .args(["--host", "127.0.0.1", "-p", &free_port().to_string()])
            .args(args)
            .current_dir(root())
            .env("RING_CONFIG", ring_config)
            .env("RUST_LOG", "info,omnikv_backend=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn rank 1");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Kill `pids` if they still run after `limit`: a hung ring fails the
/// test instead of hanging it.
fn watchdog(pids: Vec<u32>, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
}

/// The `omnikv rank R layer L: selected [...]` lines of a log, without the
/// rank: what the rank selected, pass by pass.
fn selections(log: &str, rank: usize) -> Vec<String> {
    let tag = format!("omnikv rank {rank} layer ");
    log.lines()
        .filter_map(|l| l.find(&tag).map(|i| l[i + tag.len()..].to_string()))
        .collect()
}

fn prompts() -> Vec<String> {
    tiny_prompts(&[24, 40, 64])
}

/// Greedy completions of the prompts by a server (one at a time).
fn answers(server: &Server, label: &str) -> Vec<String> {
    prompts()
        .iter()
        .map(|p| {
            server
                .chat(p, 10)
                .unwrap_or_else(|e| panic!("{label}: {e}\n{}", server.log_tail()))
                .text
        })
        .collect()
}

#[test]
fn two_ranks_over_the_ring_answer_as_one_device() {
    let _guard = serial();
    let config = std::env::temp_dir().join(format!("omnikv-tp-{}.json", std::process::id()));
    let runs: [(&str, Option<bool>); 3] = [
        ("default", None),
        ("omnikv", Some(false)),
        ("omnikv", Some(true)),
    ];
    for (backend, offload) in runs {
        let label = format!(
            "{backend}{}",
            offload.map_or("", |o| if o { " offload" } else { "" })
        );
        let mut extra: Vec<String> = Vec::new();
        if let Some(offload) = offload {
            std::fs::write(
                &config,
                serde_json::json!({
                    "do_select_layers": "0",
                    "num_wait_load_layers": 0,
                    "num_of_selected_tokens": 0.25,
                    "real_offload": offload,
                })
                .to_string(),
            )
            .unwrap();
            extra.extend(["--kv-cache-config".into(), config.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let mut args = vec!["--kv-cache".to_string(), backend.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(tiny_model_args());

        // One device.
        let single = Server::start_model(backend, &extra, &tiny_model_args())
            .expect("single-process server starts");
        let want = answers(&single, &format!("{label}, one process"));
        drop(single);

        // Two ranks.
        let [rc0, rc1] = ring_configs(&label.replace(' ', "-"));
        let daemon = Daemon::start(&args, &rc1);
        let server = Server::start_model_env(
            backend,
            &extra,
            &tiny_model_args(),
            &[
                ("RING_CONFIG", rc0.to_str().unwrap()),
                ("RUST_LOG", "info,omnikv_backend=debug"),
            ],
        )
        .unwrap_or_else(|e| panic!("{label}: rank 0 starts: {e}\nrank 1:\n{}", daemon.log()));
        watchdog(
            vec![server.pid(), daemon.child.id()],
            Duration::from_secs(240),
        );
        let got = answers(&server, &format!("{label}, two ranks"));
        assert_eq!(
            got,
            want,
            "{label}: world size 2 vs 1 greedy outputs\nrank 1:\n{}",
            daemon.log()
        );

        // Concurrent requests: the ring master admits them one at a time,
        // and each answer is the solo one.
        let concurrent: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts()
                .into_iter()
                .map(|p| {
                    let server = &server;
                    s.spawn(move || server.chat(&p, 10).map(|c| c.text))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{label}: {e}")))
                .collect()
        });
        assert_eq!(
            concurrent, want,
            "{label}: concurrent vs solo under the ring"
        );
        for p in [&rc0, &rc1] {
            let _ = std::fs::remove_file(p);
        }

        if backend == "omnikv" {
            let log0 = std::fs::read_to_string(server.log_path()).unwrap();
            let log1 = daemon.log();
            assert!(
                log0.contains("omnikv: rank 0 of 2"),
                "{label}:\n{}",
                server.log_tail()
            );
            let (s0, s1) = (selections(&log0, 0), selections(&log1, 1));
            assert!(!s0.is_empty(), "{label}: rank 0 logged no selection");
            assert_eq!(s0, s1, "{label}: the ranks selected different rows");
            // The budget selects: some selection is smaller than the rows.
            let selective = s0.iter().any(|line| {
                let picked = line.matches(',').count() + 1;
                let rows: usize = line
                    .rsplit(" of ")
                    .next()
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                picked * 2 < rows
            });
            assert!(selective, "{label}: no selection dropped rows: {s0:?}");
        }
    }
    let _ = std::fs::remove_file(&config);
}

/// Four ranks of the stock model (its KV heads replicated two by two):
/// the host's ring sum all-reduce added only the left neighbour's values,
/// right for two ranks only (patch `fixes/mistralrs-quant/0003`).
#[test]
fn four_ranks_of_the_stock_model_answer_as_one_device() {
    let _guard = serial();
    let single = Server::start_model("default", &[], &tiny_model_args()).expect("server starts");
    let want = answers(&single, "default, one process");
    drop(single);
    let configs = ring_of("four", 4);
    let mut args = vec!["--kv-cache".to_string(), "default".to_string()];
    args.extend(tiny_model_args());
    let daemons: Vec<Daemon> = configs[1..]
        .iter()
        .map(|rc| Daemon::start(&args, rc))
        .collect();
    let server = Server::start_model_env(
        "default",
        &[],
        &tiny_model_args(),
        &[("RING_CONFIG", configs[0].to_str().unwrap())],
    )
    .unwrap_or_else(|e| panic!("rank 0 starts: {e}\nrank 1:\n{}", daemons[0].log()));
    let mut pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    pids.push(server.pid());
    watchdog(pids, Duration::from_secs(240));
    assert_eq!(
        answers(&server, "default, four ranks"),
        want,
        "world size 4 vs 1"
    );
    drop(server);
    drop(daemons);
    for p in configs {
        let _ = std::fs::remove_file(p);
    }
}

/// Ranks started with different budgets would select different rows: the
/// ring answered wrongly and then hung. Both ranks now refuse at load.
#[test]
fn ranks_with_different_configurations_are_refused_at_load() {
    let _guard = serial();
    let [rc0, rc1] = ring_configs("mismatch");
    let mut children = Vec::new();
    for (rc, budget) in [(&rc0, 0.25), (&rc1, 0.5)] {
        let config = rc.with_extension("omnikv.json");
        std::fs::write(
            &config,
            serde_json::json!({"do_select_layers": "0", "num_wait_load_layers": 0,
                "num_of_selected_tokens": budget})
            .to_string(),
        )
        .unwrap();
        let child = spawn_omnikv_rank(&config, &tiny_model_args(), rc);
        children.push((child, config));
    }
    for (rank, (child, config)) in children.into_iter().enumerate() {
        let (ok, text) = exit_and_output(child);
        let _ = std::fs::remove_file(config);
        assert!(!ok, "rank {rank} kept running:\n{text}");
        assert!(
            text.contains("runs another model or KV-cache configuration than rank 0")
                && text.contains("the same --kv-cache-config"),
            "rank {rank}:\n{text}"
        );
    }
    for p in [&rc0, &rc1] {
        let _ = std::fs::remove_file(p);
    }
}

/// `mistralrs serve` as the rank of `ring_config`, `omnikv` with `config`,
/// serving `model`; output captured.
fn spawn_omnikv_rank(config: &Path, model: &[String], ring_config: &Path) -> Child {
    Command::new(mistralrs_bin())
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
        ])
        .args([
            "--kv-cache",
            "omnikv",
            "--kv-cache-config",
            config.to_str().unwrap(),
        ])
        .args(model)
        .current_dir(root())
        .env("RING_CONFIG", ring_config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mistralrs")
}

/// Wait for a rank (killed after 120 s): whether it exited successfully,
/// and its output.
fn exit_and_output(child: Child) -> (bool, String) {
    watchdog(vec![child.id()], Duration::from_secs(120));
    let out = child.wait_with_output().expect("the rank exits");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Rank 0 alone with `omnikv_config` and `model`: it must exit at start
/// (before waiting for rank 1) with an error; returns its output.
fn refused_at_start(tag: &str, omnikv_config: &str, model: &[String]) -> String {
    let [rc0, rc1] = ring_configs(tag);
    let config = std::env::temp_dir().join(format!("omnikv-tp-{tag}-{}.json", std::process::id()));
    std::fs::write(&config, omnikv_config).unwrap();
    let child = spawn_omnikv_rank(&config, model, &rc0);
    let (ok, text) = exit_and_output(child);
    for p in [&rc0, &rc1, &config] {
        let _ = std::fs::remove_file(p);
    }
    assert!(!ok, "{tag}: rank 0 started:\n{text}");
    text
}

#[test]
fn gguf_under_tensor_parallelism_is_refused_at_start() {
    let _guard = serial();
    // The real model's GGUF (`--format gguf -m ... -f ...`).
    let text = refused_at_start(
        "gguf",
        r#"{"do_select_layers": "0", "num_of_selected_tokens": 0.25}"#,
        &model_args(),
    );
    assert!(
        text.contains("not available for GGUF models") && text.contains("--format plain"),
        "{text}"
    );
}

#[test]
fn selectors_the_merge_cannot_carry_are_refused_at_start() {
    let _guard = serial();
    let text = refused_at_start(
        "softmax",
        r#"{"do_select_layers": "0", "num_of_selected_tokens": 0.25, "selector_cls": "softmax_before_last"}"#,
        &tiny_model_args(),
    );
    assert!(
        text.contains("under tensor parallelism supports `selector_cls: \"last\"` only"),
        "{text}"
    );
}

/// NCCL across two GPUs of one machine: greedy outputs equal one GPU. Runs
/// only where `OMNIKV_NCCL_BIN` names a `mistralrs` built with `--features
/// mistralrs-cli/nccl` and `nvidia-smi` lists at least two GPUs; elsewhere
/// it says why it did not run and passes.
#[test]
fn nccl_two_gpus_answer_as_one_gpu() {
    let Some(bin) = std::env::var_os("OMNIKV_NCCL_BIN") else {
        eprintln!("skipped: OMNIKV_NCCL_BIN does not name an NCCL build of mistralrs");
        return;
    };
    let gpus = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    if gpus < 2 {
        eprintln!("skipped: {gpus} GPU(s) visible, NCCL tensor parallelism needs 2");
        return;
    }
    let _guard = serial();
    let config = std::env::temp_dir().join(format!("omnikv-nccl-{}.json", std::process::id()));
    std::fs::write(
        &config,
        r#"{"do_select_layers": "0", "num_wait_load_layers": 0, "num_of_selected_tokens": 0.25}"#,
    )
    .unwrap();
    let serve = |devices: &str| -> Vec<String> {
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(["serve", "--host", "127.0.0.1", "-p", &port.to_string()])
            .args([
                "--kv-cache",
                "omnikv",
                "--kv-cache-config",
                config.to_str().unwrap(),
            ])
            .args(tiny_model_args())
            .current_dir(root())
            .env("CUDA_VISIBLE_DEVICES", devices)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the NCCL build");
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !matches!(
            integration_tests::http(port, "GET", "/v1/models", None),
            Ok((200, _))
        ) {
            assert!(
                std::time::Instant::now() < deadline,
                "the NCCL build did not come up"
            );
            assert!(child.try_wait().unwrap().is_none(), "the NCCL build exited");
            std::thread::sleep(Duration::from_millis(250));
        }
        let server = Server::attach(port).unwrap();
        let out = answers(&server, &format!("NCCL on GPUs {devices}"));
        let _ = child.kill();
        let _ = child.wait();
        out
    };
    let one = serve("0");
    let two = serve("0,1");
    let _ = std::fs::remove_file(&config);
    assert_eq!(two, one, "NCCL world size 2 vs 1 greedy outputs");
}
