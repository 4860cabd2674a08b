//! The demo's backend and the benchmarks' target: a tiny HTTP/1.1 upstream that answers
//! every request with JSON describing what it received (or, with `--fixed`, a fixed
//! body). The tests run the same server in-process (`tests/common`).
//!
//! ```text
//! cargo run --release --example demo_upstream -- --listen 127.0.0.1:9000 --name demo
//! curl -s localhost:9000/anything
//! ```

mod upstream;

use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let mut listen = "127.0.0.1:9000".to_string();
    let mut name = "demo".to_string();
    let mut fixed = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_default(),
            "--name" => name = args.next().unwrap_or_default(),
            "--fixed" => fixed = true,
            _ => {
                eprintln!("usage: demo_upstream [--listen ADDR] [--name NAME] [--fixed]");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let l = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        eprintln!("demo upstream `{name}` listening on {listen}");
        let opts = upstream::UpstreamOpts {
            name,
            fixed,
            ..Default::default()
        };
        upstream::serve(l, opts, Arc::default()).await;
        std::process::ExitCode::SUCCESS
    })
}
