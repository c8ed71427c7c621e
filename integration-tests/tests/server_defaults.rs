//! Host patches for safe serving defaults (through the real server):
//! - `mistralrs serve` without `--host` listens on the loopback interface
//!   only (`mistralrs-cli/0004-loopback-by-default`);
//! - an error inside a streamed response is an OpenAI-style error object,
//!   which the official OpenAI Python client raises as an API error with the
//!   server's message (`mistralrs-server-core/0002-openai-stream-errors`).

use std::net::{IpAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use integration_tests::{http, model_args, serial, Server};
use serde_json::{json, Value};

/// A non-loopback address of this machine, if it has one.
fn outward_address() -> Option<IpAddr> {
    // No packet is sent: connecting a UDP socket only picks a route.
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn serve_binds_loopback_by_default() {
    let _guard = serial();
    let mut args = vec!["--kv-cache".to_string(), "default".to_string()];
    args.extend(model_args());
    let server = Server::start_args("bind", &args).expect("server starts");
    assert!(
        server.log_contains(&format!("listening on http://127.0.0.1:{}", server.port)),
        "{}",
        server.log_tail()
    );
    if let Some(ip) = outward_address() {
        let reachable =
            TcpStream::connect_timeout(&(ip, server.port).into(), Duration::from_secs(2)).is_ok();
        assert!(
            !reachable,
            "the server answers on {ip}:{} without --host",
            server.port
        );
    }
}

#[test]
fn stream_errors_are_openai_error_objects() {
    let _guard = serial();
    let server = Server::start("default", &[]).expect("server starts");
    // Longer than the model's 8,192-token context.
    let long = "word ".repeat(9000);
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": long}],
        "max_tokens": 4,
        "stream": true,
    });
    let (status, text) = http(
        server.port,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
    )
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let err: Value = serde_json::from_str(events[0])
        .unwrap_or_else(|e| panic!("first event is not JSON ({e}): {text}"));
    assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("greater than 8192"),
        "{err}"
    );

    // The official client (scripts/test-requirements.txt) raises it.
    let script = format!(
        r#"
import openai, sys
client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="x")
try:
    for chunk in client.chat.completions.create(model="default", stream=True, max_tokens=4,
            messages=[{{"role": "user", "content": "word " * 9000}}]):
        pass
except openai.APIError as e:
    print("APIError:", e.message)
    sys.exit(0)
print("no error raised")
sys.exit(1)
"#,
        port = server.port
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the OpenAI Python client is missing: python3 -m pip install -r scripts/test-requirements.txt (make prepare does it)"
    );
    assert!(
        out.status.success() && stdout.contains("greater than 8192"),
        "OpenAI client:\n{stdout}\n{stderr}"
    );

    // The server keeps serving.
    let c = server.chat("What is the capital of Japan?", 8).unwrap();
    assert!(c.completion_tokens > 0);
}
