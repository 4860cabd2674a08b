//! The semantics every backend keeps (module doc of [`super`]), run against each: the
//! embedded store in a temporary directory, and a real `redis-server` this test starts on
//! a free loopback port (the test scripts install it).

use super::*;
use std::process::{Child, Command, Stdio};

/// A `redis-server` on a free loopback port, stopped (by its PID) when dropped.
pub(crate) struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    /// (Re)starts it on its port and folder (append-only: the data comes back).
    pub(crate) fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

const BIG: u64 = 1 << 30;

fn opts(expect: Option<u64>) -> WriteOpts {
    WriteOpts {
        expect,
        ttl: None,
        quota: BIG,
    }
}

async fn semantics(b: Arc<dyn Backend>) {
    let v = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    // absent, then set, then read back with its version
    assert_eq!(b.get("t/a", "k").await.unwrap(), None);
    let Written::Done(v1) = b.set("t/a", "k", v("one"), opts(None)).await.unwrap() else {
        panic!("set")
    };
    assert!(v1 > 0);
    let e = b.get("t/a", "k").await.unwrap().unwrap();
    assert_eq!((e.value.as_ref(), e.version), (&b"one"[..], v1));
    // namespaces do not see each other
    assert_eq!(b.get("t/b", "k").await.unwrap(), None);

    // compare-and-swap: the right version wins, a stale one gets the current version
    let Written::Done(v2) = b.set("t/a", "k", v("two"), opts(Some(v1))).await.unwrap() else {
        panic!("cas")
    };
    assert!(v2 > v1);
    assert_eq!(
        b.set("t/a", "k", v("three"), opts(Some(v1))).await.unwrap(),
        Written::Conflict(v2)
    );
    // Some(0): only if absent
    assert_eq!(
        b.set("t/a", "k", v("x"), opts(Some(0))).await.unwrap(),
        Written::Conflict(v2)
    );
    assert!(matches!(
        b.set("t/a", "new", v("x"), opts(Some(0))).await.unwrap(),
        Written::Done(_)
    ));

    // a version is never reused, even after a delete and a re-create
    assert_eq!(
        b.delete("t/a", "k", Some(v1)).await.unwrap(),
        Written::Conflict(v2)
    );
    assert_eq!(
        b.delete("t/a", "k", Some(v2)).await.unwrap(),
        Written::Done(0)
    );
    assert_eq!(b.get("t/a", "k").await.unwrap(), None);
    assert_eq!(b.delete("t/a", "k", None).await.unwrap(), Written::Done(0));
    let Written::Done(v3) = b.set("t/a", "k", v("again"), opts(None)).await.unwrap() else {
        panic!()
    };
    assert!(v3 > v2);

    // counters are decimal text, exact over i64
    assert_eq!(b.incr("t/a", "n", 5, BIG).await.unwrap(), 5);
    assert_eq!(b.incr("t/a", "n", -7, BIG).await.unwrap(), -2);
    assert_eq!(
        b.get("t/a", "n").await.unwrap().unwrap().value.as_ref(),
        b"-2"
    );
    b.set("t/a", "big", v(&(i64::MAX - 1).to_string()), opts(None))
        .await
        .unwrap();
    assert_eq!(b.incr("t/a", "big", 1, BIG).await.unwrap(), i64::MAX);
    assert_eq!(
        b.incr("t/a", "big", 1, BIG).await,
        Err(StateError::NotANumber)
    );
    assert_eq!(
        b.incr("t/a", "k", 1, BIG).await,
        Err(StateError::NotANumber)
    );
    assert_eq!(
        b.get("t/a", "k").await.unwrap().unwrap().value.as_ref(),
        b"again"
    );

    // listing by prefix, in order, paged
    for k in ["p/3", "p/1", "p/2", "q/1", "p"] {
        b.set("t/l", k, v("."), opts(None)).await.unwrap();
    }
    assert_eq!(
        b.list("t/l", Page::new("p/", None, 10)).await.unwrap(),
        ["p/1", "p/2", "p/3"]
    );
    assert_eq!(
        b.list("t/l", Page::new("p/", None, 2)).await.unwrap(),
        ["p/1", "p/2"]
    );
    assert_eq!(
        b.list("t/l", Page::new("p/", Some("p/2"), 10))
            .await
            .unwrap(),
        ["p/3"]
    );
    assert_eq!(
        b.list("t/l", Page::new("", None, 10)).await.unwrap(),
        ["p", "p/1", "p/2", "p/3", "q/1"]
    );
    assert!(b
        .list("t/none", Page::new("", None, 10))
        .await
        .unwrap()
        .is_empty());

    // bytes stored: keys and values of live entries; a write past the quota changes nothing
    assert_eq!(b.bytes_used("t/l").await.unwrap(), 3 * 4 + 4 + 2);
    let small = WriteOpts {
        quota: 20,
        ..opts(None)
    };
    assert_eq!(
        b.set("t/l", "r", v("0123456789"), small).await,
        Err(StateError::OverQuota(20))
    );
    assert_eq!(b.get("t/l", "r").await.unwrap(), None);
    assert_eq!(
        b.incr("t/l", "counter", 1, 20).await,
        Err(StateError::OverQuota(20))
    );
    assert_eq!(b.get("t/l", "counter").await.unwrap(), None);
    b.delete("t/l", "q/1", None).await.unwrap();
    assert_eq!(b.bytes_used("t/l").await.unwrap(), 3 * 4 + 2);
    // overwriting counts the new size only
    b.set("t/l", "p", v("..."), opts(None)).await.unwrap();
    assert_eq!(b.bytes_used("t/l").await.unwrap(), 3 * 4 + 4);

    // a TTL hides the entry once it passes, and a later write releases its bytes
    let ttl = WriteOpts {
        ttl: Some(Duration::from_millis(50)),
        ..opts(None)
    };
    b.set("t/ttl", "gone", v("soon"), ttl).await.unwrap();
    assert!(b.get("t/ttl", "gone").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(b.get("t/ttl", "gone").await.unwrap(), None);
    assert!(b
        .list("t/ttl", Page::new("", None, 10))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        b.set("t/ttl", "gone", v("x"), opts(Some(0))).await.unwrap(),
        Written::Done(match b.get("t/ttl", "gone").await.unwrap() {
            Some(e) => e.version,
            None => 0,
        })
    );
    assert_eq!(b.bytes_used("t/ttl").await.unwrap(), 5);
}

/// Concurrent compare-and-swap increments lose no update.
async fn cas_race(b: Arc<dyn Backend>) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < 25 {
                    let cur = b.get("t/race", "c").await.unwrap();
                    let (n, ver) = cur.map_or((0, 0), |e| {
                        (
                            std::str::from_utf8(&e.value)
                                .unwrap()
                                .parse::<u64>()
                                .unwrap(),
                            e.version,
                        )
                    });
                    let next = Bytes::from((n + 1).to_string());
                    if let Written::Done(_) =
                        b.set("t/race", "c", next, opts(Some(ver))).await.unwrap()
                    {
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let e = b.get("t/race", "c").await.unwrap().unwrap();
    assert_eq!(e.value.as_ref(), b"200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_the_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backend> =
        Arc::new(embedded::Embedded::open(&dir.path().join("s.redb")).unwrap());
    semantics(b.clone()).await;
    cas_race(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_same_semantics() {
    let server = RedisServer::start();
    let b: Arc<dyn Backend> =
        Arc::new(redis::Redis::connect(&server.url(), "wgtest", Duration::from_secs(2)).unwrap());
    semantics(b.clone()).await;
    cas_race(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_is_a_clear_error_and_its_return_is_noticed() {
    let mut server = RedisServer::start();
    let url = server.url();
    let b = redis::Redis::connect(&url, "wgtest", Duration::from_millis(300)).unwrap();
    b.set("t/a", "k", Bytes::from_static(b"v"), opts(None))
        .await
        .unwrap();
    server.kill();
    let err = b.get("t/a", "k").await.unwrap_err();
    assert!(matches!(err, StateError::Unavailable(_)), "{err:?}");
    // back on the same port, with its append-only file
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let value = loop {
        match b.get("t/a", "k").await {
            Ok(v) => break v,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("redis back but still {e}"),
        }
    };
    assert_eq!(value.unwrap().value.as_ref(), b"v");
}

#[tokio::test]
async fn the_store_checks_limits_and_counts_usage() {
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(embedded::Embedded::open(&dir.path().join("s.redb")).unwrap());
    let store = Store::new(
        b,
        StateLimits {
            max_key_bytes: 8,
            max_value_bytes: 4,
            max_total_bytes: 100,
            ops_per_sec: 5,
        },
    );
    let usage = Arc::new(crate::wasm::meter::Usage::default());
    let a = store.tenant("a", Some(usage.clone()));
    assert_eq!(a.get("").await, Err(StateError::BadKey(8)));
    assert_eq!(a.get("123456789").await, Err(StateError::BadKey(8)));
    assert_eq!(
        a.set("k", Bytes::from_static(b"12345"), None, None).await,
        Err(StateError::ValueTooLarge(4))
    );
    a.set("k", Bytes::from_static(b"1234"), None, None)
        .await
        .unwrap();
    assert_eq!(a.get("k").await.unwrap().unwrap().value.as_ref(), b"1234");
    for _ in 0..2 {
        a.get("k").await.unwrap();
    }
    // 5 a second with as much burst: the 6th call in a row is refused
    assert_eq!(a.get("k").await, Err(StateError::RateLimited));
    let t = usage.totals();
    assert_eq!((t.state_reads, t.state_writes), (3, 1));
    // another tenant has its own namespace and its own rate
    let b = store.tenant("b", None);
    assert_eq!(b.get("k").await.unwrap(), None);
}
