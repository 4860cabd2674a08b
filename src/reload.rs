//! The live conf: the current [`Snapshot`] behind an `ArcSwap`, and reloads on SIGHUP or
//! when the conf file changes (debounced). A reload builds the whole new snapshot off the
//! request path (compiling modules included) and swaps it in only if it is valid; a bad
//! conf is logged with every error and the old one keeps serving.

use crate::config::{self, ConfErrors, LoadEnv, Snapshot};
use crate::metrics::Metrics;
use crate::wasm;
use arc_swap::ArcSwap;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long file events must settle before a reload.
const DEBOUNCE: Duration = Duration::from_millis(150);

pub struct Live {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    pub metrics: Arc<Metrics>,
    pub wasm: Arc<wasm::Runtime>,
    generation: AtomicU64,
    reloading: tokio::sync::Mutex<()>,
    /// The generation serving now, for those who follow reloads (see [`Live::subscribe`]).
    published: tokio::sync::watch::Sender<u64>,
}

impl Live {
    /// Loads the first snapshot (generation 1).
    pub fn open(
        path: &Path,
        metrics: Arc<Metrics>,
        wasm: Arc<wasm::Runtime>,
    ) -> Result<Live, ConfErrors> {
        let snap = config::load(
            path,
            &LoadEnv {
                metrics: &metrics,
                wasm: &wasm,
                generation: 1,
            },
        )?;
        metrics.generation.set(1);
        Ok(Live {
            current: ArcSwap::from_pointee(snap),
            path: path.to_path_buf(),
            metrics,
            wasm,
            generation: AtomicU64::new(1),
            reloading: tokio::sync::Mutex::new(()),
            published: tokio::sync::watch::Sender::new(1),
        })
    }

    /// Follows reloads: the receiver sees the generation change each time a new
    /// snapshot is published (then [`Live::load`] returns it). Views built from a
    /// snapshot (the control plane's) rebuild themselves from it; the conf side never
    /// needs to know them.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The snapshot serving now. One atomic load and a reference count.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the conf file; swaps it in if valid. Runs the load on a blocking thread
    /// since it compiles modules.
    pub async fn reload(self: &Arc<Self>) -> Result<Arc<Snapshot>, ConfErrors> {
        let _one_at_a_time = self.reloading.lock().await;
        let this = self.clone();
        let gen = self.generation.load(Ordering::Relaxed) + 1;
        let result = tokio::task::spawn_blocking(move || {
            config::load(
                &this.path,
                &LoadEnv {
                    metrics: &this.metrics,
                    wasm: &this.wasm,
                    generation: gen,
                },
            )
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfErrors(vec![config::ConfError {
                file: self.path.clone(),
                line: 0,
                column: 0,
                message: format!("reload task failed: {e}"),
            }]))
        });
        match result {
            Ok(snap) => {
                let snap = Arc::new(snap);
                let old = self.current.swap(snap.clone());
                self.generation.store(gen, Ordering::Relaxed);
                if old.listeners != snap.listeners {
                    tracing::warn!(
                        "listener changes take effect only after a restart or graceful upgrade"
                    );
                }
                snap.start();
                self.published.send_replace(gen);
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.generation.set(gen as i64);
                tracing::info!(generation = gen, "{}", snap.summary());
                Ok(snap)
            }
            Err(e) => {
                // the rejected conf's node must not stay: guests keep the serving one's
                self.wasm.set_node(self.load().node.clone());
                self.metrics.reloads.with_label_values(&["failed"]).inc();
                tracing::error!("conf rejected, still serving generation {}:\n{e}", gen - 1);
                Err(e)
            }
        }
    }
}

/// Background service: starts the first snapshot's health checks and timers, then
/// reloads on SIGHUP and on file changes until shutdown.
pub struct Reloader {
    pub live: Arc<Live>,
    pub watch: bool,
}

impl Reloader {
    async fn reload(&self) {
        // a rejected conf is logged by `Live::reload`; the old one keeps serving
        let _ = self.live.reload().await;
    }
}

#[async_trait::async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.live.load().start();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let _watcher = if self.watch {
            watch_file(&self.live.path, tx.clone())
        } else {
            None
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading conf");
                    self.reload().await;
                }
                Some(()) = rx.recv() => {
                    // debounce: editors write in several steps
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    tracing::info!("conf file changed: reloading");
                    self.reload().await;
                }
            }
        }
    }
}

fn watch_file(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let file = path.canonicalize().ok()?;
    let dir = file.parent()?.to_path_buf();
    let target = file.clone();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let relevant = matches!(ev.kind, EventKind::Modify(_) | EventKind::Create(_))
                && ev.paths.iter().any(|p| p == &target);
            if relevant {
                let _ = tx.try_send(());
            }
        }
    })
    .map_err(|e| tracing::error!("cannot watch the conf file: {e}"))
    .ok()?;
    // watch the folder: editors often replace the file rather than write it in place
    w.watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::error!("cannot watch {}: {e}", dir.display()))
        .ok()?;
    Some(w)
}
