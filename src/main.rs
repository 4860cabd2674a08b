//! The `wasmgate` command: parse arguments, then hand over to the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version,
    about = "Edge gateway running tenant WebAssembly hooks (Proxy-Wasm v0.2.1) on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway on a conf file. SIGHUP or saving the file reloads it; SIGTERM
    /// shuts down gracefully; SIGQUIT hands the listeners to a new process started
    /// with --upgrade.
    Serve {
        #[arg(short, long, env = "WASMGATE_CONFIG")]
        config: PathBuf,
        /// Take the listeners over from a running gateway (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a conf file like `nginx -t`: exit 0 with a one-line summary, or 1 with
    /// every error found (file:line:column: reason). Compiles its modules too.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run a small JSON upstream (the demo's backend and the benchmark's target).
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Name reported in answers and the x-upstream header.
        #[arg(long, default_value = "demo")]
        name: String,
        /// Answer a fixed {"ok":true} instead of echoing the request.
        #[arg(long)]
        fixed: bool,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.cmd {
        Cmd::Serve { config, upgrade } => match wasmgate::server::run(&config, upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check { config } => check(&config),
        Cmd::DemoUpstream {
            listen,
            name,
            fixed,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async {
                let l = match tokio::net::TcpListener::bind(&listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: cannot listen on {listen}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                eprintln!("demo upstream `{name}` listening on {listen}");
                let opts = wasmgate::demo::UpstreamOpts {
                    name,
                    fixed,
                    ..Default::default()
                };
                wasmgate::demo::serve(l, opts, Arc::default()).await;
                ExitCode::SUCCESS
            })
        }
    }
}

fn check(config: &std::path::Path) -> ExitCode {
    let metrics = wasmgate::metrics::Metrics::new();
    // `check` must not touch the data directory: compile in memory only.
    let runtime = match wasmgate::wasm::Runtime::new(None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let env = wasmgate::config::LoadEnv {
        metrics: &metrics,
        wasm: &runtime,
        generation: 0,
    };
    match wasmgate::config::load(config, &env) {
        Ok(s) => {
            println!("{}", s.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

// glibc malloc showed up as ~10% of the proxy's CPU; see the README's measurements.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
