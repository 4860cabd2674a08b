//! Assembles the Pingora server from a loaded conf: the proxy service with its listeners,
//! the metrics listener, and the reload service. `main` calls [`run`]; nothing here is
//! request logic.

use crate::metrics::Metrics;
use crate::proxy::access_log::AccessLog;
use crate::proxy::conn::ClientApp;
use crate::proxy::Gateway;
use crate::reload::{Live, Reloader};
use crate::wasm;
use anyhow::Context as _;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use std::path::Path;
use std::sync::Arc;

/// Loads the conf (returning its errors if it is invalid) and serves it until shutdown.
pub fn run(conf: &Path, upgrade: bool) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let runtime = Arc::new(wasm::Runtime::new(true)?);
    // a bad conf stops here, before any port is bound; `main` prints its errors
    let live = Arc::new(
        Live::open(conf, metrics.clone(), runtime.clone())
            .map_err(|e| anyhow::anyhow!("the conf is invalid:\n{e}"))?,
    );
    let snap = live.load();
    tracing::info!("{}", snap.summary());
    let data_dir = snap.server.data_dir.clone();

    let sc = ServerConf {
        threads: snap.server.threads,
        work_stealing: snap.server.work_stealing,
        grace_period_seconds: Some(snap.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(snap.server.grace_period.as_secs()),
        upgrade_sock: data_dir.join("upgrade.sock").to_string_lossy().into_owned(),
        pid_file: data_dir.join("wasmgate.pid").to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, sc);
    server.bootstrap();

    let access_log = if snap.access_log.enabled {
        Some(AccessLog::start(
            snap.access_log.path.as_deref(),
            metrics.access_log_dropped.clone(),
        )?)
    } else {
        None
    };
    let control = Arc::new(crate::control::Control::open(
        live.clone(),
        metrics.clone(),
        &data_dir.join("control"),
    )?);
    let mut gateway = Gateway::new(live.clone(), metrics.clone(), access_log);
    gateway.control = Some(control.clone());
    runtime.set_dispatch(gateway.callouts());
    // every accepted stream is wrapped: exact connection count, request-head deadline
    let fast = crate::proxy::fast::FastPath::new(
        gateway.clone(),
        pingora::connectors::TransportConnector::new(Some(
            pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration),
        )),
    );
    let app = ClientApp::new(
        pingora::proxy::http_proxy(&server.configuration, gateway),
        Some(fast),
        live.clone(),
        metrics.clone(),
    );
    let mut proxy = pingora::services::listening::Service::new("wasmgate proxy".into(), app);
    for l in &snap.listeners {
        match &l.tls {
            None => proxy.add_tcp(&l.addr),
            Some(tls) => {
                let settings = crate::tls::listener_settings(tls)
                    .map_err(|e| anyhow::anyhow!("listener `{}`: {e}", l.name))?;
                proxy.add_tls_with_settings(&l.addr, None, settings);
            }
        }
    }
    server.add_service(proxy);

    if let Some(addr) = snap.metrics_listen {
        let app = MetricsApp {
            metrics: metrics.clone(),
        };
        let mut svc = pingora::services::listening::Service::new(
            "wasmgate metrics".into(),
            HttpServer::new_app(app),
        );
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    if !snap.admin.listen.is_empty() {
        let loopback = snap
            .admin
            .listen
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false);
        if !loopback {
            tracing::warn!(listen = %snap.admin.listen, "the admin API listens beyond loopback");
        }
        if !control.has_operator_token() {
            tracing::warn!(
                "no operator token (set ${} or [admin] token): only tenant tokens are accepted",
                snap.admin.token_env
            );
        }
        server.add_service(background_service(
            "wasmgate admin",
            crate::control::api::AdminService {
                control: control.clone(),
                listen: snap.admin.listen.clone(),
            },
        ));
    }
    // folds usage and keeps it in data_dir, whether or not the admin API runs
    server.add_service(background_service(
        "wasmgate usage",
        crate::control::UsageKeeper {
            control: control.clone(),
        },
    ));
    server.add_service(background_service(
        "wasmgate reload",
        Reloader {
            live: live.clone(),
            watch: snap.server.watch_config,
        },
    ));
    server.add_service(background_service(
        "wasmgate cluster",
        crate::control::ClusterService {
            control: control.clone(),
        },
    ));
    server.add_service(background_service(
        "wasmgate control",
        crate::control::ControlService::new(control.clone()),
    ));
    drop(snap);
    server.run_forever()
}

/// `/metrics` in Prometheus text format; anything else is 404.
struct MetricsApp {
    metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        if path != "/metrics" {
            return http::Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(br#"{"error":"not_found"}"#.to_vec())
                .unwrap_or_default();
        }
        let body = self.metrics.render();
        http::Response::builder()
            .status(200)
            .header("content-type", "text/plain; version=0.0.4")
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}
