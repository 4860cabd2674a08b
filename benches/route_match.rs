//! Route matching cost with 10, 1 000 and 10 000 routes: must stay flat (hash lookups
//! and a radix tree), well under 1 µs. Prints `figure route_match_10k_ns=…` for
//! scripts/bench.sh.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::Method;
use wasmgate::routing::{PathPattern, RouteKey, Router};

/// A realistic mix: hosts, exact paths with params, prefixes, method-specific routes.
fn table(n: usize) -> Router {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let host = match i % 4 {
            0 => None,
            1 => Some(format!("svc{}.example.com", i % 50)),
            2 => Some(format!("*.t{}.example.com", i % 30)),
            _ => None,
        };
        let path = match i % 3 {
            0 => PathPattern::Exact(format!("/api/v{}/users/{{id}}/items{i}", i % 7)),
            1 => PathPattern::Prefix(format!("/static/{i}")),
            _ => PathPattern::Exact(format!("/svc/{i}/health")),
        };
        keys.push(RouteKey {
            host,
            path,
            methods: if i % 5 == 0 {
                vec![Method::GET]
            } else {
                vec![]
            },
        });
    }
    let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    match Router::build(&keys, &names) {
        Ok(r) => r,
        Err(e) => panic!("bench table has conflicts: {:?}", &e[..e.len().min(3)]),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [10usize, 1_000, 10_000] {
        let r = table(n);
        // a path that exists in every table size (route index 3 is an exact path with a param)
        let path = "/api/v3/users/42/items3";
        assert!(r.find("other.org", path, &Method::GET).is_ok());
        g.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| {
                r.find(
                    black_box("other.org"),
                    black_box(path),
                    black_box(&Method::GET),
                )
            })
        });
        g.bench_function(format!("{n}_routes_wildcard_host_prefix"), |b| {
            b.iter(|| {
                r.find(
                    black_box("a.t2.example.com"),
                    black_box("/static/1/x/y"),
                    black_box(&Method::GET),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
