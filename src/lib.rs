//! wasmgate: an edge gateway on Pingora that runs tenant WebAssembly (Proxy-Wasm v0.2.1)
//! on every request, under microsecond budgets.
//!
//! Rooms: [`config`] (conf file → immutable [`config::Snapshot`]), [`routing`] (host,
//! path, method → route), [`proxy`] (the `ProxyHttp` phases), [`wasm`] (engine, module
//! cache, the Proxy-Wasm host), [`reload`] (live snapshot swaps), [`server`] (assembly).

pub mod cluster;
pub mod config;
pub mod control;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod routing;
pub mod server;
pub mod state;
pub mod tenant;
pub mod tls;
pub mod upstream;
pub mod wasm;
