//! The conf file parser (TOML into the serde schema with `deny_unknown_fields`) and the
//! router built from whatever routes parse: neither may panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/config/file.rs"]
mod file;
#[allow(dead_code)]
#[path = "../../src/routing.rs"]
mod routing;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(conf) = toml::from_str::<file::ConfFile>(text) else { return };
    let mut keys = Vec::new();
    let mut names = Vec::new();
    for (i, r) in conf.routes.iter().enumerate() {
        let r = r.get_ref();
        let path = match (&r.path, &r.path_prefix) {
            (Some(p), None) if p.get_ref().starts_with('/') => routing::PathPattern::Exact(p.get_ref().clone()),
            (None, Some(p)) if p.get_ref().starts_with('/') => routing::PathPattern::Prefix(p.get_ref().clone()),
            _ => continue,
        };
        keys.push(routing::RouteKey {
            host: r.host.as_ref().map(|h| h.get_ref().clone()),
            path,
            methods: r
                .methods
                .iter()
                .filter_map(|m| http::Method::from_bytes(m.get_ref().as_bytes()).ok())
                .collect(),
        });
        names.push(format!("r{i}"));
    }
    if let Ok(router) = routing::Router::build(&keys, &names) {
        for probe in ["/", "/a", "/a/b/c", "/users/1"] {
            let _ = router.find("h.example.com", probe, &http::Method::GET);
        }
    }
});
