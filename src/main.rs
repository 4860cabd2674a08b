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
    /// Create a tenant (operator only).
    Tenant {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        name: String,
        /// Limits as JSON, e.g. {"rate_per_sec": 100, "max_concurrency": 10}
        #[arg(long, default_value = "{}")]
        limits: String,
    },
    /// Deploy a module for a tenant (compiled, then swapped in), optionally bound as a
    /// function URL (/TENANT/FUNCTION).
    Deploy {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        file: PathBuf,
        /// Plugin configuration passed to on_configure (JSON).
        #[arg(long)]
        config: Option<String>,
        /// Bind it as a function URL: /TENANT/FUNCTION
        #[arg(long)]
        bind: Option<String>,
    },
    /// Print a tenant's hook logs; --follow streams them live.
    Logs {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        follow: bool,
    },
    /// Print a tenant's usage per module (JSON).
    Usage {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Manage tenant tokens.
    Token {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: TokenCmd,
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

/// Logs go to stderr, at `RUST_LOG` or `default`.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` prints its result and nothing else (module loading logs at info); the
    // client commands print answers. RUST_LOG still turns logs on for any command.
    init_tracing(match cli.cmd {
        Cmd::Serve { .. } | Cmd::DemoUpstream { .. } => "info",
        _ => "off",
    });
    match cli.cmd {
        Cmd::Serve { config, upgrade } => match wasmgate::server::run(&config, upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check { config } => check(&config),
        Cmd::Tenant {
            admin,
            name,
            limits,
        } => {
            let limits: serde_json::Value = match serde_json::from_str(&limits) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: --limits is not JSON: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let body = serde_json::json!({ "name": name, "limits": limits }).to_string();
            admin_call(&admin, "POST", "/v1/tenants", body.as_bytes())
        }
        Cmd::Deploy {
            admin,
            tenant,
            name,
            file,
            config,
            bind,
        } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let mut path = format!("/v1/tenants/{tenant}/modules/{name}");
            if let Some(c) = config {
                path += &format!("?config={}", wasmgate::control::client::encode(&c));
            }
            let code = admin_call(&admin, "PUT", &path, &bytes);
            if code != ExitCode::SUCCESS {
                return code;
            }
            match bind {
                None => ExitCode::SUCCESS,
                Some(b) => {
                    let f = b
                        .trim_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let body = serde_json::json!({ "module": name }).to_string();
                    admin_call(
                        &admin,
                        "PUT",
                        &format!("/v1/tenants/{tenant}/functions/{f}"),
                        body.as_bytes(),
                    )
                }
            }
        }
        Cmd::Logs {
            admin,
            tenant,
            follow,
        } => {
            let c = client(&admin);
            if follow {
                match c.follow(&format!("/v1/tenants/{tenant}/logs?follow=true"), |l| {
                    println!("{l}")
                }) {
                    Ok(200) => ExitCode::SUCCESS,
                    Ok(_) => ExitCode::FAILURE,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            } else {
                admin_call(&admin, "GET", &format!("/v1/tenants/{tenant}/logs"), b"")
            }
        }
        Cmd::Usage {
            admin,
            tenant,
            from,
            to,
        } => {
            let mut q = Vec::new();
            if let Some(f) = from {
                q.push(format!("from={f}"));
            }
            if let Some(t) = to {
                q.push(format!("to={t}"));
            }
            let path = format!("/v1/tenants/{tenant}/usage?{}", q.join("&"));
            admin_call(&admin, "GET", &path, b"")
        }
        Cmd::Token { admin, cmd } => match cmd {
            TokenCmd::Create {
                tenant,
                ops,
                ttl_secs,
            } => {
                let ops: Vec<&str> = ops
                    .split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .collect();
                let body = serde_json::json!({ "ops": ops, "ttl_secs": ttl_secs }).to_string();
                admin_call(
                    &admin,
                    "POST",
                    &format!("/v1/tenants/{tenant}/tokens"),
                    body.as_bytes(),
                )
            }
            TokenCmd::Revoke { jti } => {
                admin_call(&admin, "DELETE", &format!("/v1/tokens/{jti}"), b"")
            }
        },
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

fn client(a: &AdminArgs) -> wasmgate::control::client::Client {
    wasmgate::control::client::Client {
        addr: a.admin.clone(),
        token: a.token.clone(),
    }
}

/// One admin call: prints the JSON answer; fails on a non-2xx status.
fn admin_call(a: &AdminArgs, method: &str, path: &str, body: &[u8]) -> ExitCode {
    match client(a).call(method, path, body) {
        Ok(r) if (200..300).contains(&r.status) => {
            println!("{}", r.body);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("error: {} {}", r.status, r.body);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot reach the admin API at {}: {e}", a.admin);
            ExitCode::FAILURE
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

/// Where the admin API is and who is asking.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API address.
    #[arg(long, env = "WASMGATE_ADMIN", default_value = "127.0.0.1:9092")]
    admin: String,
    /// Operator or tenant token.
    #[arg(long, env = "WASMGATE_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a tenant token (operator only); prints it.
    Create {
        #[arg(long)]
        tenant: String,
        /// Comma-separated: deploy,logs,usage
        #[arg(long, default_value = "deploy,logs,usage")]
        ops: String,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Revoke a token by its id (operator only).
    Revoke { jti: String },
}
