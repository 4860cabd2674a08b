//! The `wasmgate` command: parse arguments, then hand over to the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Tenants (operator token): list, show, create, update their limits, delete.
    Tenants {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
    /// Deploy a module for a tenant (compiled, then swapped in), optionally bound as a
    /// function. FILE is a .wasm module or component, or source built into a component
    /// here: a .js file (componentize-js), a .py file (componentize-py) or a Rust crate
    /// directory (wasm32-wasip2); a function is bound under its name and its URL printed.
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
        /// Budget of one callback (µs), within the tenant's max_budget_us.
        #[arg(long)]
        budget_us: Option<u64>,
        /// Memory per instance (MiB), within the tenant's max_memory_mb.
        #[arg(long)]
        memory_mb: Option<u64>,
        /// A function's requests per instance before it is retired (1, the default: a
        /// fresh instance per request).
        #[arg(long)]
        requests_per_instance: Option<u32>,
        /// Also bind it as function FUNCTION (a trailing path like /TENANT/FUNCTION is
        /// accepted too); its URL is printed.
        #[arg(long, value_name = "FUNCTION")]
        bind: Option<String>,
    },
    /// A tenant's modules: list, versions, activate, rollback, delete.
    Modules {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: ModulesCmd,
    },
    /// A tenant's function URLs: list, bind (optionally guarding an upstream), unbind.
    Functions {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: FunctionsCmd,
    },
    /// Modules a tenant attaches to conf routes it owns: list, attach.
    Routes {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: RoutesCmd,
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
    /// A tenant's key-value store (for debugging): get, put, delete, list.
    Kv {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// A tenant's secrets: set (value from stdin), list (names only), delete; and the
    /// key rotation.
    Secret {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// The cluster (`[cluster]`): `status` shows this node's view and every node seen.
    Cluster {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// This node's cluster state (connected, sequence, last sync, propagation lag) and
    /// the nodes heard from, with their versions.
    Status,
}

/// Logs go to stderr, at `RUST_LOG` or `default`.
fn init_tracing(default: &str) {
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(if env.is_empty() { default } else { &env })
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    if !env.contains("pingora_proxy") {
        // Pingora's proxy logs a client's broken or refused connection as an ERROR line;
        // the gateway logs each failed request itself, at a level that fits its cause.
        // `RUST_LOG=pingora_proxy=…` brings those lines back.
        filter = filter.add_directive("pingora_proxy=off".parse().expect("valid directive"));
    }
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
        Cmd::Serve { .. } => "info",
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
        Cmd::Tenants { admin, cmd } => tenants(&admin, cmd),
        Cmd::Deploy {
            admin,
            tenant,
            name,
            file,
            config,
            budget_us,
            memory_mb,
            requests_per_instance,
            bind,
        } => {
            // source (JavaScript, Python, a Rust crate) is built into a component first
            let started = std::time::Instant::now();
            let bytes = match wasmgate::control::componentize::build(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if file.extension().is_none_or(|x| x != "wasm") {
                eprintln!(
                    "built {} ({} bytes) in {} ms",
                    file.display(),
                    bytes.len(),
                    started.elapsed().as_millis()
                );
            }
            let mut q = Vec::new();
            if let Some(c) = config {
                q.push(format!("config={}", encode(&c)));
            }
            if let Some(b) = budget_us {
                q.push(format!("budget_us={b}"));
            }
            if let Some(m) = memory_mb {
                q.push(format!("memory_mb={m}"));
            }
            if let Some(n) = requests_per_instance {
                q.push(format!("requests_per_instance={n}"));
            }
            let path = format!(
                "/v1/tenants/{}/modules/{}?{}",
                encode(&tenant),
                encode(&name),
                q.join("&")
            );
            let Some(answer) = call(&admin, "PUT", &path, &bytes) else {
                return ExitCode::FAILURE;
            };
            println!("{answer}");
            // a function gets a URL under its own name unless --bind names another
            let function = serde_json::from_str::<serde_json::Value>(&answer)
                .is_ok_and(|v| v["kind"] == "function");
            match bind.or_else(|| function.then(|| name.clone())) {
                None => ExitCode::SUCCESS,
                Some(b) => {
                    let f = b.trim_matches('/').rsplit('/').next().unwrap_or_default();
                    bind_function(&admin, &tenant, f, &name, None)
                }
            }
        }
        Cmd::Modules { admin, cmd } => modules(&admin, cmd),
        Cmd::Functions { admin, cmd } => functions(&admin, cmd),
        Cmd::Routes { admin, cmd } => routes(&admin, cmd),
        Cmd::Logs {
            admin,
            tenant,
            follow,
        } => {
            let Some(c) = client(&admin) else {
                return ExitCode::FAILURE;
            };
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
                // the same plain lines as --follow, not a JSON array of them
                match call(&admin, "GET", &format!("/v1/tenants/{tenant}/logs"), b"") {
                    Some(body) => {
                        let lines: Vec<String> = serde_json::from_str(&body).unwrap_or_default();
                        for l in lines {
                            println!("{l}");
                        }
                        ExitCode::SUCCESS
                    }
                    None => ExitCode::FAILURE,
                }
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
                let body =
                    serde_json::json!({ "ops": list(&ops), "ttl_secs": ttl_secs }).to_string();
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
        Cmd::Kv { admin, cmd } => kv(&admin, cmd),
        Cmd::Secret { admin, cmd } => secret(&admin, cmd),
        Cmd::Cluster {
            admin,
            cmd: ClusterCmd::Status,
        } => admin_call(&admin, "GET", "/v1/cluster", b""),
    }
}

fn kv(a: &AdminArgs, cmd: KvCmd) -> ExitCode {
    let at = |t: &str, k: &str| format!("/v1/tenants/{}/kv/{}", encode(t), encode(k));
    match cmd {
        KvCmd::Get { tenant, key } => admin_call(a, "GET", &at(&tenant, &key), b""),
        KvCmd::Put {
            tenant,
            key,
            value,
            version,
            ttl_ms,
        } => {
            let value = if value == "-" {
                match read_stdin() {
                    Some(v) => v,
                    None => return ExitCode::FAILURE,
                }
            } else {
                value.into_bytes()
            };
            let mut q = Vec::new();
            if let Some(v) = version {
                q.push(format!("version={v}"));
            }
            if let Some(t) = ttl_ms {
                q.push(format!("ttl_ms={t}"));
            }
            let path = format!("{}?{}", at(&tenant, &key), q.join("&"));
            admin_call(a, "PUT", &path, &value)
        }
        KvCmd::Delete { tenant, key } => admin_call(a, "DELETE", &at(&tenant, &key), b""),
        KvCmd::List {
            tenant,
            prefix,
            after,
            limit,
        } => {
            let mut path = format!(
                "/v1/tenants/{}/kv?prefix={}&limit={limit}",
                encode(&tenant),
                encode(&prefix)
            );
            if let Some(after) = after {
                path.push_str(&format!("&after={}", encode(&after)));
            }
            admin_call(a, "GET", &path, b"")
        }
    }
}

fn secret(a: &AdminArgs, cmd: SecretCmd) -> ExitCode {
    let at = |t: &str| format!("/v1/tenants/{}/secrets", encode(t));
    match cmd {
        SecretCmd::Set { tenant, name } => {
            let Some(value) = read_stdin() else {
                return ExitCode::FAILURE;
            };
            let path = format!("{}/{}", at(&tenant), encode(&name));
            admin_call(a, "PUT", &path, &value)
        }
        SecretCmd::List { tenant } => admin_call(a, "GET", &at(&tenant), b""),
        SecretCmd::Delete { tenant, name } => admin_call(
            a,
            "DELETE",
            &format!("{}/{}", at(&tenant), encode(&name)),
            b"",
        ),
        SecretCmd::RotateKey => admin_call(a, "POST", "/v1/secrets/rotate-key", b""),
    }
}

/// Standard input, whole (a secret or a value piped in).
fn read_stdin() -> Option<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    match std::io::stdin().read_to_end(&mut v) {
        Ok(_) => Some(v),
        Err(e) => {
            eprintln!("error: cannot read stdin: {e}");
            None
        }
    }
}

fn encode(s: &str) -> String {
    wasmgate::control::client::encode(s)
}

/// The client for the admin API, or `None` (with the reason printed) without a token.
fn client(a: &AdminArgs) -> Option<wasmgate::control::client::Client> {
    match a.token.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(wasmgate::control::client::Client {
            addr: a.admin.clone(),
            token: t.to_string(),
        }),
        None => {
            eprintln!(
                "error: no token: set WASMGATE_TOKEN or pass --token (the operator token, or a tenant token from `wasmgate token create`)"
            );
            None
        }
    }
}

/// One admin call: the answer's body on a 2xx status; otherwise prints why, `None`.
fn call(a: &AdminArgs, method: &str, path: &str, body: &[u8]) -> Option<String> {
    match client(a)?.call(method, path, body) {
        Ok(r) if (200..300).contains(&r.status) => Some(r.body),
        Ok(r) => {
            eprintln!("error: {} {}", r.status, r.body);
            if r.status == 401 {
                eprintln!("the admin API refused the token in WASMGATE_TOKEN / --token");
            }
            None
        }
        Err(e) => {
            eprintln!("error: cannot reach the admin API at {}: {e}", a.admin);
            None
        }
    }
}

/// One admin call: prints the JSON answer; fails on a non-2xx status.
fn admin_call(a: &AdminArgs, method: &str, path: &str, body: &[u8]) -> ExitCode {
    match call(a, method, path, body) {
        Some(b) => {
            println!("{b}");
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

fn json_arg(flag: &str, text: &str) -> Option<serde_json::Value> {
    match serde_json::from_str(text) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("error: {flag} is not JSON: {e}");
            None
        }
    }
}

fn tenants(a: &AdminArgs, cmd: TenantsCmd) -> ExitCode {
    match cmd {
        TenantsCmd::List => admin_call(a, "GET", "/v1/tenants", b""),
        TenantsCmd::Show { name } => {
            admin_call(a, "GET", &format!("/v1/tenants/{}", encode(&name)), b"")
        }
        TenantsCmd::Create { name, limits } => {
            let Some(limits) = json_arg("--limits", &limits) else {
                return ExitCode::FAILURE;
            };
            let body = serde_json::json!({ "name": name, "limits": limits }).to_string();
            admin_call(a, "POST", "/v1/tenants", body.as_bytes())
        }
        TenantsCmd::Update { name, limits } => {
            let Some(limits) = json_arg("--limits", &limits) else {
                return ExitCode::FAILURE;
            };
            let path = format!("/v1/tenants/{}", encode(&name));
            admin_call(a, "PATCH", &path, limits.to_string().as_bytes())
        }
        TenantsCmd::Delete { name } => {
            admin_call(a, "DELETE", &format!("/v1/tenants/{}", encode(&name)), b"")
        }
    }
}

fn modules(a: &AdminArgs, cmd: ModulesCmd) -> ExitCode {
    let path = |t: &str, m: Option<&str>, rest: &str| match m {
        None => format!("/v1/tenants/{}/modules", encode(t)),
        Some(m) => format!("/v1/tenants/{}/modules/{}{rest}", encode(t), encode(m)),
    };
    match cmd {
        ModulesCmd::List { tenant } => admin_call(a, "GET", &path(&tenant, None, ""), b""),
        ModulesCmd::Versions { tenant, name } => {
            admin_call(a, "GET", &path(&tenant, Some(&name), ""), b"")
        }
        ModulesCmd::Activate {
            tenant,
            name,
            version,
        } => {
            let body = serde_json::json!({ "version": version }).to_string();
            let p = path(&tenant, Some(&name), "/activate");
            admin_call(a, "POST", &p, body.as_bytes())
        }
        ModulesCmd::Rollback { tenant, name } => {
            admin_call(a, "POST", &path(&tenant, Some(&name), "/rollback"), b"")
        }
        ModulesCmd::Delete { tenant, name } => {
            admin_call(a, "DELETE", &path(&tenant, Some(&name), ""), b"")
        }
    }
}

fn bind_function(
    a: &AdminArgs,
    tenant: &str,
    function: &str,
    module: &str,
    upstream: Option<&str>,
) -> ExitCode {
    let body = serde_json::json!({ "module": module, "upstream": upstream }).to_string();
    let path = format!(
        "/v1/tenants/{}/functions/{}",
        encode(tenant),
        encode(function)
    );
    admin_call(a, "PUT", &path, body.as_bytes())
}

fn functions(a: &AdminArgs, cmd: FunctionsCmd) -> ExitCode {
    match cmd {
        FunctionsCmd::List { tenant } => {
            admin_call(a, "GET", &tenant_path(&tenant, &["functions"]), b"")
        }
        FunctionsCmd::Bind {
            tenant,
            name,
            module,
            upstream,
        } => bind_function(a, &tenant, &name, &module, upstream.as_deref()),
        FunctionsCmd::Unbind { tenant, name } => {
            let path = tenant_path(&tenant, &["functions", &name]);
            admin_call(a, "DELETE", &path, b"")
        }
    }
}

/// `/v1/tenants/{tenant}/{parts…}`, each part percent-encoded.
fn tenant_path(tenant: &str, parts: &[&str]) -> String {
    let mut path = format!("/v1/tenants/{}", encode(tenant));
    for p in parts {
        path.push('/');
        path.push_str(&encode(p));
    }
    path
}

fn routes(a: &AdminArgs, cmd: RoutesCmd) -> ExitCode {
    match cmd {
        RoutesCmd::List { tenant } => admin_call(a, "GET", &tenant_path(&tenant, &["routes"]), b""),
        RoutesCmd::Attach {
            tenant,
            route,
            modules,
        } => {
            let body = serde_json::json!({ "modules": list(&modules) }).to_string();
            let path = tenant_path(&tenant, &["routes", &route]);
            admin_call(a, "PUT", &path, body.as_bytes())
        }
    }
}

fn check(config: &std::path::Path) -> ExitCode {
    let metrics = wasmgate::metrics::Metrics::new();
    // `check` must not touch the data directory: compile in memory only.
    let runtime = match wasmgate::wasm::Runtime::new(false) {
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

/// Where the admin API is and who is asking. Global, so they may follow a subcommand
/// (`wasmgate token create --token X`) as well as precede it.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API address.
    #[arg(
        long,
        env = "WASMGATE_ADMIN",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    admin: String,
    /// Operator or tenant token (better in WASMGATE_TOKEN: arguments show in `ps`).
    #[arg(long, env = "WASMGATE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum TenantsCmd {
    /// Every tenant, from the conf and the API, with its limits.
    List,
    /// One tenant: limits, modules, functions.
    Show { name: String },
    /// Create a tenant.
    Create {
        #[arg(long)]
        name: String,
        /// Limits as JSON, e.g. {"rate_per_sec": 100, "max_concurrency": 10}
        #[arg(long, default_value = "{}")]
        limits: String,
    },
    /// Change a tenant's limits: the fields given replace the current ones, null clears.
    Update {
        name: String,
        /// e.g. {"rate_per_sec": 50, "burst": null}
        #[arg(long)]
        limits: String,
    },
    /// Delete a tenant with its modules and functions.
    Delete { name: String },
}

#[derive(Subcommand)]
enum ModulesCmd {
    /// The tenant's modules with their versions.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// One module's versions (digest, size, upload time, exports) and the active one.
    Versions {
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// Activate a version.
    Activate {
        #[arg(long)]
        tenant: String,
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Activate the version before the active one.
    Rollback {
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// Delete a module with its versions; functions bound to it are unbound.
    Delete {
        #[arg(long)]
        tenant: String,
        name: String,
    },
}

#[derive(Subcommand)]
enum FunctionsCmd {
    /// The tenant's functions and their modules.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Bind a function URL to a module; prints its URL.
    Bind {
        #[arg(long)]
        tenant: String,
        name: String,
        #[arg(long)]
        module: String,
        /// Guard this upstream (one of the tenant's allowed_upstreams) instead of
        /// answering from the module.
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Remove a function URL.
    Unbind {
        #[arg(long)]
        tenant: String,
        name: String,
    },
}

#[derive(Subcommand)]
enum RoutesCmd {
    /// Modules the tenant attached to its conf routes.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Attach modules (in order, after the conf's hooks) to a conf route with
    /// `tenant = "TENANT"`; an empty list detaches them.
    Attach {
        #[arg(long)]
        tenant: String,
        route: String,
        /// Comma-separated module names.
        #[arg(long, default_value = "")]
        modules: String,
    },
}

#[derive(Subcommand)]
enum KvCmd {
    /// Print a key's value and version (JSON).
    Get {
        #[arg(long)]
        tenant: String,
        key: String,
    },
    /// Store a value (the argument, or stdin with `-`); `--version N` stores it only if
    /// the key is at version N now (0: only if absent).
    Put {
        #[arg(long)]
        tenant: String,
        key: String,
        value: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    Delete {
        #[arg(long)]
        tenant: String,
        key: String,
    },
    /// Keys starting with a prefix.
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Set a secret; its value is read from stdin (never from the command line).
    Set {
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// The tenant's secrets: names and update times, never values.
    List {
        #[arg(long)]
        tenant: String,
    },
    Delete {
        #[arg(long)]
        tenant: String,
        name: String,
    },
    /// A new secret key (operator only): every secret is re-sealed with it.
    RotateKey,
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

/// A comma-separated argument's items, trimmed, empty ones left out.
fn list(csv: &str) -> Vec<&str> {
    csv.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}
