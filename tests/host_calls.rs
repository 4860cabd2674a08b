//! Host calls in-process: small WAT guests call one capability after another from
//! `proxy_on_request_headers` and record each status as a request header (`x-s`, the
//! letter `A` + status) and each value the host gave as `x-v`; the tests read them back
//! from the request head. Then the VM lifecycle: callback order, a shared VM's state
//! across requests, a fresh instance per request, and a trapped VM replaced.

use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Duration;
use wasmgate::metrics::Metrics;
use wasmgate::wasm::abi::{self, Status, Status::*};
use wasmgate::wasm::{
    Cause, Compilers, FailurePolicy, FilterLimits, Isolation, Outcome, Plugin, PluginSpec,
    RequestInfo, Runtime, Tier,
};

/// Every host call the tests use, a bump allocator, and the two recorders.
const PRELUDE: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register_queue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $seen (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $n))))
  (data (i32.const 0) "x-s")
  (data (i32.const 4) "x-v")
  ;; x-s: 'A' + status
  (func $rec (param $s i32)
    (i32.store8 (i32.const 8) (i32.add (i32.const 65) (local.get $s)))
    (drop (call $add_header (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 1))))
  ;; x-v: the bytes the host gave through the return slots at 16 (address) and 20 (size)
  (func $show
    (drop (call $add_header (i32.const 0) (i32.const 4) (i32.const 3)
      (i32.load (i32.const 16)) (i32.load (i32.const 20)))))
"#;

/// A guest whose `proxy_on_request_headers` runs `body` (with locals `$a`..`$d`), with
/// `data` segments from address 256 on. `body` is WAT, or a script of recorded host
/// calls (see [`script`]), or both.
fn guest(body: &str, data: &str) -> Vec<u8> {
    let body = script(body);
    let wat = format!(
        r#"(module {PRELUDE}
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $a i32) (local $b i32) (local $c i32) (local $d i32)
    {body}
    (i32.const 0))
  {data})"#
    );
    wat::parse_str(&wat).expect("test WAT")
}

fn spec(isolation: Isolation) -> PluginSpec {
    PluginSpec {
        name: "probe".into(),
        tenant: "t1".into(),
        root_id: String::new(),
        config: b"the-config".to_vec(),
        vm_config: Vec::new(),
        isolation,
        policy: FailurePolicy::Deny(503),
        limits: FilterLimits {
            budget: Duration::from_millis(50),
            request_budget: Duration::from_millis(200),
            memory_bytes: 16 << 20,
            max_instances: 2,
            min_tick: Duration::from_millis(10),
        },
        allowed_upstreams: Vec::new(),
    }
}

fn plugin_with(bytes: &[u8], spec: PluginSpec) -> Arc<Plugin> {
    let rt = Runtime::new(false).expect("runtime");
    rt.plugin(spec, bytes, &Metrics::new()).expect("plugin")
}

fn plugin(bytes: &[u8]) -> Arc<Plugin> {
    plugin_with(bytes, spec(Isolation::Shared))
}

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/api?x=1", None).unwrap();
    r.insert_header("host", "example.com").unwrap();
    r.insert_header("x-api-key", "k1").unwrap();
    r
}

/// Runs one request's headers through `p`: the outcome and the head after it.
fn run(p: &Arc<Plugin>) -> (Outcome, RequestHeader) {
    let mut req = request();
    let mut info = RequestInfo::default();
    let mut lease = p.try_lease().expect("lease");
    let out = lease.on_request_headers(&mut req, &mut info, true);
    lease.finish(Some(&req), None, &mut info);
    (out, req)
}

fn all(req: &RequestHeader, name: &str) -> Vec<String> {
    req.headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// The statuses a guest recorded, in order.
fn statuses(req: &RequestHeader) -> Vec<Status> {
    let table = [
        Status::Ok,
        Status::NotFound,
        Status::BadArgument,
        Status::SerializationFailure,
        Status::ParseFailure,
        Status::Empty, // 5 is unused by the ABI
        Status::InvalidMemoryAccess,
        Status::Empty,
        Status::CasMismatch,
        Status::Empty, // 9 is unused
        Status::InternalFailure,
        Status::BrokenConnection,
        Status::Unimplemented,
    ];
    all(req, "x-s")
        .iter()
        .map(|s| {
            let code = (s.as_bytes()[0] - b'A') as usize;
            assert!(code != 5 && code != 9, "status {code} is not in the ABI");
            table[code]
        })
        .collect()
}

/// Turns each script line `host_call arg.. [show]` into WAT that records the call's
/// status (and with `show`, the value it gave); lines starting with `(` or `;` are WAT
/// and stay as they are. An argument is an i32 (`256`, `0x7ffffff0`, `-1`), the i32
/// stored at an address (`@28`) or an i64 (`i64:5`).
fn script(body: &str) -> String {
    let mut wat = String::new();
    for line in body.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('(') || line.starts_with(';') {
            wat.push_str(line);
            wat.push('\n');
            continue;
        }
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let show = words.last() == Some(&"show");
        if show {
            words.pop();
        }
        let args: String = words[1..]
            .iter()
            .map(|a| match (a.strip_prefix('@'), a.strip_prefix("i64:")) {
                (Some(addr), _) => format!(" (i32.load (i32.const {addr}))"),
                (_, Some(n)) => format!(" (i64.const {n})"),
                _ => format!(" (i32.const {a})"),
            })
            .collect();
        wat.push_str(&format!("(call $rec (call ${}{args}))\n", words[0]));
        if show {
            wat.push_str("(call $show)\n");
        }
    }
    wat
}

/// Runs one request through a shared-VM plugin of `guest(body, data)`.
fn probe(body: &str, data: &str) -> (Outcome, RequestHeader) {
    run(&plugin(&guest(body, data)))
}

/// A plugin whose one recorded `call` is given a serialized header map at address 512:
/// `MAP` in `call` stands for its address and size.
fn with_map(call: &str, map: &[u8]) -> Arc<Plugin> {
    let bytes: String = map.iter().map(|c| format!("\\{c:02x}")).collect();
    plugin(&guest(
        &call.replace("MAP", &format!("512 {}", map.len())),
        &format!(r#"(data (i32.const 512) "{bytes}")"#),
    ))
}

#[test]
fn header_reads_answer_envoys_statuses() {
    let (out, req) = probe(
        r#"
        get_header 0 256 9 16 20 show
        get_header 0 272 9 16 20
        get_header 0 0x7ffffff0 64 16 20
        get_header 9 256 9 16 20
        get_header 0 256 9 0x7ffffff0 20
        get_header 0 288 5 16 20 show
        get_header 0 304 10 16 20 show
        get_header 2 256 9 16 20
        ;; all pairs of a map the callback does not have: Ok and empty, as Envoy
        get_pairs 2 16 20
        (call $rec (i32.load (i32.const 20)))
        "#,
        r#"(data (i32.const 256) "x-api-key") (data (i32.const 272) "x-missing")
           (data (i32.const 288) ":path") (data (i32.const 304) ":authority")"#,
    );
    assert!(matches!(out, Outcome::Continue), "{out:?}");
    assert_eq!(
        statuses(&req),
        [
            Ok,
            NotFound,
            InvalidMemoryAccess,
            BadArgument,
            InvalidMemoryAccess,
            Ok,
            Ok,
            // the response map in the request phase is "not currently available"
            BadArgument,
            Ok,
            Ok, // (the size recorded: 0)
        ]
    );
    assert_eq!(all(&req, "x-v"), ["k1", "/api?x=1", "example.com"]);
}

#[test]
fn header_changes_apply_to_the_lent_head_only() {
    let (_, req) = probe(
        r#"
        replace_header 0 256 5 264 4
        add_header 0 272 3 276 1
        remove_header 0 280 9
        replace_header 2 272 3 276 1
        add_header 0 296 8 276 1
        remove_header 0 256 5
        replace_header 0 256 5 312 17
        "#,
        r#"(data (i32.const 256) ":path") (data (i32.const 264) "/new")
           (data (i32.const 272) "x-a") (data (i32.const 276) "1")
           (data (i32.const 280) "x-api-key") (data (i32.const 296) "bad name")
           (data (i32.const 312) "http://evil/path")"#,
    );
    assert_eq!(
        statuses(&req),
        // no response head to change in the request phase: Envoy's BadArgument
        [
            Ok,
            Ok,
            Ok,
            BadArgument,
            BadArgument,
            BadArgument,
            BadArgument
        ]
    );
    assert_eq!(req.uri.path(), "/new");
    assert_eq!(all(&req, "x-a"), ["1"]);
    assert!(req.headers.get("x-api-key").is_none());
}

#[test]
fn setting_all_pairs_replaces_regular_headers_and_keeps_the_rest() {
    let pairs = abi::serialize_map([(&b"x-new"[..], &b"v"[..]), (b":path", b"/p")]);
    let p = with_map("set_pairs 0 MAP", &pairs);
    let (_, req) = run(&p);
    assert_eq!(statuses(&req), [Status::Ok]);
    assert_eq!(req.uri.path(), "/p");
    assert_eq!(all(&req, "x-new"), ["v"]);
    assert!(req.headers.get("x-api-key").is_none());
    // Host is `:authority`, which was not given: it stays
    assert_eq!(all(&req, "host"), ["example.com"]);
}

#[test]
fn properties_round_trip_and_read_envoys_attributes() {
    let (_, req) = probe(
        r#"
        set_property 256 7 264 2
        get_property 256 7 16 20 show
        get_property 272 12 16 20 show
        get_property 288 11 16 20 show
        get_property 304 4 16 20
        "#,
        r#"(data (i32.const 256) "my.prop") (data (i32.const 264) "v1")
           (data (i32.const 272) "request\00path") (data (i32.const 288) "plugin_name")
           (data (i32.const 304) "nope")"#,
    );
    assert_eq!(statuses(&req), [Ok, Ok, Ok, Ok, NotFound]);
    assert_eq!(all(&req, "x-v"), ["v1", "/api?x=1", "probe"]);
}

#[test]
fn buffers_are_what_the_callback_was_given() {
    let (_, req) = probe(
        r#"
        get_buffer 7 4 6 16 20 show
        get_buffer 7 99 1 16 20
        get_buffer 0 0 10 16 20
        get_buffer 4 0 10 16 20
        get_buffer 2 0 10 16 20
        get_buffer 42 0 10 16 20
        "#,
        "",
    );
    assert_eq!(
        statuses(&req),
        [
            Ok,
            BadArgument,
            NotFound,
            NotFound,
            Unimplemented,
            BadArgument
        ]
    );
    assert_eq!(all(&req, "x-v"), ["config"]);
}

#[test]
fn a_local_reply_is_recorded_for_the_proxy_with_its_details() {
    let p = plugin(&guest(
        r#"
        local 99 0 0 0 0 0 0 -1
        local 403 256 11 272 2 0 0 -1
        "#,
        r#"(data (i32.const 256) "not allowed") (data (i32.const 272) "no")"#,
    ));
    let mut req = request();
    let mut info = RequestInfo::default();
    let mut lease = p.try_lease().expect("lease");
    let out = lease.on_request_headers(&mut req, &mut info, true);
    lease.finish(Some(&req), None, &mut info);
    assert_eq!(statuses(&req), [BadArgument, Ok]);
    match out {
        Outcome::Respond(r) => {
            assert_eq!((r.status, r.body.as_slice()), (403, &b"no"[..]));
        }
        other => panic!("expected a local reply, got {other:?}"),
    }
    // whitespace in the details becomes `_`, as Envoy's `response.code_details`
    assert_eq!(info.code_details.as_deref(), Some("not_allowed"));
}

/// A local reply whose headers include one no HTTP message can carry still goes out
/// (refusing it would let a denied request through), without that header.
#[test]
fn a_local_reply_drops_headers_that_are_not_http() {
    let map = wasmgate::wasm::abi::serialize_map([
        (&b"bad name"[..], &b"1"[..]),
        (b"x-ok", b"2"),
        (b"x-bad-value", b"a\r\nb"),
    ]);
    let p = with_map("local 403 0 0 0 0 MAP -1", &map);
    let (out, req) = run(&p);
    assert_eq!(statuses(&req), [Status::Ok]);
    match out {
        Outcome::Respond(r) => {
            assert_eq!(r.status, 403);
            assert_eq!(r.headers, [("x-ok".to_string(), b"2".to_vec())]);
        }
        other => panic!("expected a local reply, got {other:?}"),
    }
}

/// HTTP/1's Host is `:authority`, as Envoy keeps `host` in that slot: a filter's added
/// `host` joins the one Host with a comma (never a second Host line, which upstreams
/// refuse), a removal removes it, a replacement sets it.
#[test]
fn host_writes_change_the_one_authority() {
    let (_, req) = probe(
        r#"
        add_header 0 256 4 264 9
        get_header 0 296 10 16 20 show
        remove_header 0 256 4
        get_header 0 256 4 16 20
        replace_header 0 256 4 280 9
        "#,
        r#"(data (i32.const 256) "host") (data (i32.const 264) "b.example") (data (i32.const 280) "c.example")
           (data (i32.const 296) ":authority")"#,
    );
    assert_eq!(statuses(&req), [Ok, Ok, Ok, NotFound, Ok]);
    assert_eq!(all(&req, "x-v"), ["example.com,b.example"]);
    assert_eq!(all(&req, "host"), ["c.example"]);
}

#[test]
fn the_effective_context_switches_only_between_root_and_this_request() {
    let (_, req) = probe(
        r#"
        (local.set $a (call $effective (i32.const 1)))
        ;; the root context has no request map until it switches back (Envoy: BadArgument)
        (local.set $b (call $get_header (i32.const 0) (i32.const 256) (i32.const 9) (i32.const 16) (i32.const 20)))
        (local.set $c (call $effective (i32.const 999)))
        (local.set $d (call $effective (local.get $ctx)))
        (call $rec (local.get $a)) (call $rec (local.get $b))
        (call $rec (local.get $c)) (call $rec (local.get $d))
        get_header 0 256 9 16 20
        "#,
        r#"(data (i32.const 256) "x-api-key")"#,
    );
    assert_eq!(statuses(&req), [Ok, BadArgument, BadArgument, Ok, Ok]);
}

#[test]
fn shared_data_compares_and_swaps() {
    let (_, req) = probe(
        r#"
        set_shared 256 1 260 2 0
        get_shared 256 1 16 20 24 show
        set_shared 256 1 264 2 99
        set_shared 256 1 264 2 @24
        get_shared 256 1 16 20 24 show
        get_shared 268 1 16 20 24
        "#,
        r#"(data (i32.const 256) "k") (data (i32.const 260) "v1") (data (i32.const 264) "v2")
           (data (i32.const 268) "z")"#,
    );
    assert_eq!(statuses(&req), [Ok, Ok, CasMismatch, Ok, Ok, NotFound]);
    assert_eq!(all(&req, "x-v"), ["v1", "v2"]);
}

#[test]
fn queues_hand_items_over_in_order_and_say_when_empty() {
    let (_, req) = probe(
        r#"
        register_queue 256 1 28
        enqueue @28 260 4
        dequeue @28 16 20 show
        dequeue @28 16 20
        enqueue 12345 260 4
        "#,
        r#"(data (i32.const 256) "q") (data (i32.const 260) "item")"#,
    );
    assert_eq!(statuses(&req), [Ok, Ok, Ok, Empty, NotFound]);
    assert_eq!(all(&req, "x-v"), ["item"]);
}

#[test]
fn metrics_count_and_refuse_what_their_kind_cannot_do() {
    let (_, req) = probe(
        r#"
        define_metric 0 256 4 32
        increment_metric @32 i64:5
        increment_metric @32 i64:-1
        get_metric @32 40
        (call $rec (i32.eqz (i64.eq (i64.load (i32.const 40)) (i64.const 5))))
        get_metric 777 40
        define_metric 7 256 4 32
        "#,
        r#"(data (i32.const 256) "hits")"#,
    );
    // the fifth is the guest's own check that the counter reads 5 (0 = equal)
    assert_eq!(
        statuses(&req),
        [Ok, Ok, BadArgument, Ok, Ok, NotFound, BadArgument]
    );
}

#[test]
fn calls_not_offered_answer_a_status_never_a_trap() {
    let (out, req) = probe(
        r#"
        foreign 256 3 0 0 16 20
        done
        "#,
        r#"(data (i32.const 256) "abc")"#,
    );
    assert!(matches!(out, Outcome::Continue));
    assert_eq!(statuses(&req), [NotFound, NotFound]);
}

#[test]
fn host_calls_are_paid_from_the_budget() {
    // reads one header forever: only the fuel host calls cost can stop it
    let mut s = spec(Isolation::Shared);
    s.limits.budget = Duration::from_micros(200);
    let p = plugin_with(
        &guest(
            r#"(loop $l
                 (drop (call $get_header (i32.const 0) (i32.const 256) (i32.const 9) (i32.const 16) (i32.const 20)))
                 (br $l))"#,
            r#"(data (i32.const 256) "x-api-key")"#,
        ),
        s,
    );
    match run(&p).0 {
        Outcome::Failed(f) => assert!(matches!(f.cause, Cause::Overrun), "{:?}", f.cause),
        other => panic!("expected an overrun, got {other:?}"),
    }
}

/// A guest that logs its lifecycle and counts the requests its instance saw (`x-n`).
const LIFECYCLE: &str = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (global $seen (mut i32) (i32.const 0))
  (data (i32.const 0) "x-n")
  (data (i32.const 16) "vm_start")
  (data (i32.const 32) "create")
  (data (i32.const 48) "done")
  (data (i32.const 64) "log")
  (data (i32.const 80) "delete")
  (data (i32.const 96) "x-trap")
  (func $say (param $p i32) (param $n i32) (drop (call $log (i32.const 2) (local.get $p) (local.get $n))))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $n))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $say (i32.const 16) (i32.const 8)) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32) (call $say (i32.const 32) (i32.const 6)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 96) (i32.const 6) (i32.const 200) (i32.const 204)))
      (then unreachable))
    (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
    (i32.store8 (i32.const 8) (i32.add (i32.const 48) (global.get $seen)))
    (drop (call $add_header (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (call $say (i32.const 48) (i32.const 4)) (i32.const 1))
  (func (export "proxy_on_log") (param i32) (call $say (i32.const 64) (i32.const 3)))
  (func (export "proxy_on_delete") (param i32) (call $say (i32.const 80) (i32.const 6))))"#;

fn messages(p: &Plugin) -> Vec<String> {
    p.log
        .recent()
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["message"].as_str().unwrap().to_string()
        })
        .collect()
}

fn seen(p: &Arc<Plugin>, trap: bool) -> Option<String> {
    let mut req = request();
    if trap {
        req.insert_header("x-trap", "1").unwrap();
    }
    let mut info = RequestInfo::default();
    let mut lease = p.try_lease().expect("lease");
    let out = lease.on_request_headers(&mut req, &mut info, true);
    lease.finish(Some(&req), None, &mut info);
    match out {
        Outcome::Continue => Some(all(&req, "x-n").concat()),
        Outcome::Failed(_) => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_http_context_ends_with_done_then_log_then_delete() {
    let p = plugin(&wat::parse_str(LIFECYCLE).unwrap());
    assert_eq!(seen(&p, false).as_deref(), Some("1"));
    // the VM: its root context created, then started (as Envoy); the request: its
    // context, then its end
    assert_eq!(
        messages(&p),
        ["create", "vm_start", "create", "done", "log", "delete"]
    );
}

#[test]
fn a_shared_vm_keeps_its_state_and_a_trapped_one_is_replaced() {
    let p = plugin(&wat::parse_str(LIFECYCLE).unwrap());
    assert_eq!(seen(&p, false).as_deref(), Some("1"));
    assert_eq!(seen(&p, false).as_deref(), Some("2"));
    assert_eq!(seen(&p, true), None);
    // the trapped instance is gone: a new one starts counting again
    assert_eq!(seen(&p, false).as_deref(), Some("1"));
    let starts = messages(&p).iter().filter(|m| *m == "vm_start").count();
    assert_eq!(starts, 2);
}

#[test]
fn request_isolation_gives_every_request_a_fresh_instance() {
    let p = plugin_with(
        &wat::parse_str(LIFECYCLE).unwrap(),
        spec(Isolation::Request),
    );
    for _ in 0..3 {
        assert_eq!(seen(&p, false).as_deref(), Some("1"));
    }
}

/// Later instances take a module's callbacks by the export indices its first instance
/// found, each resolved on its first call (see `Vm::boot`): the same callbacks, also in a
/// module with `malloc` and `_start` in place of the SDKs' names; an export of the wrong
/// type is refused, never taken.
#[test]
fn every_instance_finds_the_callbacks_its_module_exports() {
    let variant = LIFECYCLE
        .replace("proxy_on_memory_allocate", "malloc")
        .replace(
            r#"(func (export "proxy_abi_version_0_2_1"))"#,
            r#"(func (export "proxy_abi_version_0_2_1"))
           (func (export "_start") (global.set $seen (i32.const 4)))"#,
        );
    let bytes = wat::parse_str(&variant).unwrap();
    let mut rt = Runtime::new(false).expect("runtime");
    rt.set_snapshots(false);
    let fresh = rt
        .plugin(spec(Isolation::Request), &bytes, &Metrics::new())
        .expect("plugin");
    for _ in 0..3 {
        assert_eq!(seen(&fresh, false).as_deref(), Some("5"));
    }
    // every instance: its root context created and started, the request's context through
    // to its end, then the root context's end (after the instance that checked the module)
    let request = ["create", "done", "log", "delete", "done", "delete"];
    let started = [&["create", "vm_start"][..], &request].concat();
    assert_eq!(messages(&fresh)[4..], started.repeat(3));
    // from a snapshot: the same callbacks, the start ran once (for the snapshot)
    let snapped = plugin_with(&bytes, spec(Isolation::Request));
    assert!(snapped.snapshotted());
    for _ in 0..3 {
        assert_eq!(seen(&snapped, false).as_deref(), Some("5"));
    }
    assert_eq!(messages(&snapped)[8..], request.repeat(3));

    let wrong = LIFECYCLE.replace(
        r#"(func (export "proxy_on_done") (param i32) (result i32)"#,
        r#"(func (export "proxy_on_done") (param i32 i32) (result i32)"#,
    );
    let rt = Runtime::new(false).expect("runtime");
    for isolation in [Isolation::Shared, Isolation::Request] {
        let refused = rt.plugin(
            spec(isolation),
            &wat::parse_str(&wrong).unwrap(),
            &Metrics::new(),
        );
        let e = refused
            .err()
            .expect("a callback of the wrong type is refused")
            .to_string();
        assert!(e.contains("proxy_on_done has the wrong type"), "{e}");
    }
}

/// Idle VMs never fill the instance pool: a module that parked many (its `max_instances`)
/// and another that then used the rest leave room for a third module's fresh instance.
/// Before the cap, 1000 parked VMs made every other module answer busy until a restart
/// (found by an outside trial).
#[test]
fn idle_vms_leave_room_in_the_instance_pool() {
    let rt = Runtime::new(false).expect("runtime");
    let bytes = wat::parse_str(LIFECYCLE).unwrap();
    let shared = |name: &str| {
        let mut spec = spec(Isolation::Shared);
        spec.name = name.into();
        spec.limits.max_instances = 600;
        rt.plugin(spec, &bytes, &Metrics::new()).expect("plugin")
    };
    let (a, b) = (shared("a"), shared("b"));
    let fresh = rt
        .plugin(spec(Isolation::Request), &bytes, &Metrics::new())
        .expect("plugin");
    // a: 600 requests at once, then all its VMs wait idle
    let leases: Vec<_> = (0..600).map(|_| a.try_lease().expect("a lease")).collect();
    drop(leases);
    // b: as many at once as the pool allows, then idle too
    let leases: Vec<_> = std::iter::from_fn(|| b.try_lease().ok()).collect();
    assert!(leases.len() >= 400, "b got {} VMs", leases.len());
    drop(leases);
    assert!(matches!(run(&fresh).0, Outcome::Continue));
    // a pool that requests fill answers busy, not a trap
    let mut all: Vec<_> = std::iter::from_fn(|| a.try_lease().ok()).collect();
    all.extend(std::iter::from_fn(|| b.try_lease().ok()));
    let busy = fresh.try_lease().err().expect("the pool is full");
    assert!(matches!(busy.cause, Cause::Busy), "{busy:?}");
    drop(all);
    assert!(matches!(run(&fresh).0, Outcome::Continue));
}

/// The guest counts in its memory instead of a global: a byte in its data segment (5 at
/// first) and one in zero-filled memory past it. Fresh instances reuse pooled slots whose
/// touched pages are reset in place (see `engine_config`): each must see both as the
/// module left them.
#[test]
fn fresh_instances_see_the_memory_their_module_declares() {
    let counting = LIFECYCLE
        .replace(
            r#"(data (i32.const 96) "x-trap")"#,
            r#"(data (i32.const 96) "x-trap") (data (i32.const 300) "\05")"#,
        )
        .replace(
            "(global.set $seen (i32.add (global.get $seen) (i32.const 1)))",
            "(i32.store8 (i32.const 40000) (i32.add (i32.load8_u (i32.const 40000)) (i32.const 1)))
             (i32.store8 (i32.const 300) (i32.add (i32.load8_u (i32.const 300)) (i32.const 1)))
             (global.set $seen (i32.add (i32.load8_u (i32.const 40000)) (i32.load8_u (i32.const 300))))",
        );
    let shared = plugin(&wat::parse_str(&counting).unwrap());
    let fresh = plugin_with(
        &wat::parse_str(&counting).unwrap(),
        spec(Isolation::Request),
    );
    // the counter byte is '0' + zero-filled count + data count: 7 on a clean instance
    assert_eq!(seen(&shared, false).as_deref(), Some("7"));
    assert_eq!(seen(&shared, false).as_deref(), Some("9"));
    for _ in 0..4 {
        assert_eq!(seen(&fresh, false).as_deref(), Some("7"));
    }
}

/// A plugin on a runtime with these compilers.
fn plugin_on(compilers: Compilers, bytes: &[u8], spec: PluginSpec) -> (Runtime, Arc<Plugin>) {
    let rt = Runtime::with_compilers(false, compilers).expect("runtime");
    let p = rt.plugin(spec, bytes, &Metrics::new()).expect("plugin");
    (rt, p)
}

/// Sums 1..=n in a loop, stores the sum in memory and records its low byte.
fn summing(n: u32) -> Vec<u8> {
    guest(
        &format!(
            r#"(local.set $a (i32.const {n}))
               (loop $l
                 (local.set $b (i32.add (local.get $b) (local.get $a)))
                 (i32.store (i32.const 300) (local.get $b))
                 (local.set $a (i32.sub (local.get $a) (i32.const 1)))
                 (br_if $l (local.get $a)))
               (call $rec (i32.and (i32.load (i32.const 300)) (i32.const 15)))"#
        ),
        "",
    )
}

#[test]
fn baseline_code_is_metered_and_limited_as_optimized_code_is() {
    let n = 10_000u32;
    let expect = (n * (n + 1) / 2) & 15;
    let mut fuel = Vec::new();
    for compilers in [Compilers::Optimized, Compilers::Baseline] {
        let (_rt, p) = plugin_on(compilers, &summing(n), spec(Isolation::Shared));
        let before = p.fuel_spent();
        let (out, req) = run(&p);
        assert!(matches!(out, Outcome::Continue), "{compilers:?}: {out:?}");
        let letter = char::from(b'A' + expect as u8).to_string();
        assert_eq!(all(&req, "x-s"), [letter], "{compilers:?}");
        fuel.push(p.fuel_spent() - before);
        assert_eq!(
            p.compiled.tier(),
            match compilers {
                Compilers::Baseline => Tier::Baseline,
                _ => Tier::Optimized,
            }
        );
    }
    // Winch and Cranelift count the same operators: one request costs the same fuel
    let (optimized, baseline) = (fuel[0], fuel[1]);
    eprintln!("fuel per request: optimized {optimized}, baseline {baseline}");
    assert!(optimized > u64::from(n) * 4, "{optimized}");
    assert_eq!(baseline, optimized);

    // the budget stops an endless loop, and memory cannot grow past the module's limit,
    // on baseline code too
    let mut s = spec(Isolation::Shared);
    s.limits.budget = Duration::from_micros(200);
    let endless = guest("(loop $l (br $l))", "");
    let (_rt, p) = plugin_on(Compilers::Baseline, &endless, s);
    match run(&p).0 {
        Outcome::Failed(f) => assert!(matches!(f.cause, Cause::Overrun), "{:?}", f.cause),
        other => panic!("expected an overrun, got {other:?}"),
    }
    // 16 MiB allowed, 2 pages declared: 254 more pages fit, 255 do not
    let grow = guest(
        "(call $rec (i32.add (i32.const 2) (memory.grow (i32.const 255))))
         (call $rec (i32.add (i32.const 2) (memory.grow (i32.const 254))))",
        "",
    );
    let (_rt, p) = plugin_on(Compilers::Baseline, &grow, spec(Isolation::Shared));
    let (_, req) = run(&p);
    // memory.grow answers the old size (2 pages) or -1: recorded as 2 + that
    assert_eq!(all(&req, "x-s"), ["B", "E"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_go_live_on_baseline_code_and_move_to_optimized_code_without_a_failure() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/guests/out/api_key_auth.wasm"
    ))
    .expect("built guests (scripts/build-guests.sh)");
    let mut s = spec(Isolation::Shared);
    s.config = br#"{"keys": ["k1"]}"#.to_vec();
    s.limits.max_instances = 8;
    let (rt, p) = plugin_on(Compilers::Tiered, &bytes, s);
    // requests from four tasks while the optimizer works; then until each task saw the
    // new code
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline {
                    let mut req = request();
                    let mut info = RequestInfo::default();
                    let mut lease = p.lease().await.expect("lease");
                    let tier = lease.tier().expect("a VM");
                    let out = lease.on_request_headers(&mut req, &mut info, true);
                    lease.finish(Some(&req), None, &mut info);
                    assert!(matches!(out, Outcome::Continue), "{tier:?}: {out:?}");
                    if seen.last() != Some(&tier) {
                        seen.push(tier);
                    }
                    if tier == Tier::Optimized && seen.len() > 1 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                seen
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), [Tier::Baseline, Tier::Optimized]);
    }
    assert!(rt.wait_optimized(Duration::from_secs(30)));
    assert_eq!(p.compiled.tier(), Tier::Optimized);
    // a key the guest does not know is still refused on the new code
    let mut req = request();
    req.insert_header("x-api-key", "nope").unwrap();
    let mut info = RequestInfo::default();
    let mut lease = p.lease().await.expect("lease");
    assert_eq!(lease.tier(), Some(Tier::Optimized));
    let out = lease.on_request_headers(&mut req, &mut info, true);
    lease.finish(Some(&req), None, &mut info);
    assert!(
        matches!(out, Outcome::Respond(ref r) if r.status == 401),
        "{out:?}"
    );
}

/// A guest whose start builds state: `on_vm_start` counts itself in a metric,
/// `on_configure` keeps its configuration; each request records the configuration kept
/// (`x-v`) and the starts so far (`x-s`, `A` + count).
fn configured() -> Vec<u8> {
    let wat = format!(
        r#"(module {PRELUDE}
  (data (i32.const 256) "starts")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $define_metric (i32.const 0) (i32.const 256) (i32.const 6) (i32.const 32)))
    (drop (call $increment_metric (i32.load (i32.const 32)) (i64.const 1)))
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $get_buffer (i32.const 7) (i32.const 0) (local.get 1) (i32.const 40) (i32.const 44)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_header (i32.const 0) (i32.const 4) (i32.const 3)
      (i32.load (i32.const 40)) (i32.load (i32.const 44))))
    (drop (call $get_metric (i32.load (i32.const 32)) (i32.const 48)))
    (call $rec (i32.wrap_i64 (i64.load (i32.const 48))))
    (i32.const 0)))"#
    );
    wat::parse_str(&wat).expect("test WAT")
}

/// Two requests through `p`: each one's (`x-v`, `x-s`).
fn twice(p: &Arc<Plugin>) -> Vec<(String, String)> {
    (0..2)
        .map(|_| {
            let (out, req) = run(p);
            assert!(matches!(out, Outcome::Continue), "{out:?}");
            (all(&req, "x-v").concat(), all(&req, "x-s").concat())
        })
        .collect()
}

fn configured_with(rt: &Runtime, config: &str) -> Arc<Plugin> {
    let mut s = spec(Isolation::Request);
    s.config = config.as_bytes().to_vec();
    rt.plugin(s, &configured(), &Metrics::new())
        .expect("plugin")
}

/// Fresh instances from a snapshot see the state the start built (the configuration
/// `on_configure` kept) without running the start: the starts counted stay at two (the
/// instance that checked the module, the one the snapshot was taken from), where without
/// a snapshot every request's instance starts again. A changed configuration is another
/// snapshot; a reconfigured module starts its instances again until it has one.
#[test]
fn snapshots_serve_what_the_start_built_without_running_it() {
    let mut rt = Runtime::new(false).expect("runtime");
    rt.set_snapshots(false);
    let p = configured_with(&rt, "the-config");
    assert!(!p.snapshotted());
    let v = |s: &str| s.to_string();
    assert_eq!(
        twice(&p),
        [(v("the-config"), v("C")), (v("the-config"), v("D"))]
    );

    let rt = Runtime::new(false).expect("runtime");
    let a = configured_with(&rt, "config-a");
    let b = configured_with(&rt, "config-b");
    assert!(a.snapshotted() && b.snapshotted());
    assert_eq!(
        twice(&a),
        [(v("config-a"), v("C")), (v("config-a"), v("C"))]
    );
    assert_eq!(
        twice(&b),
        [(v("config-b"), v("C")), (v("config-b"), v("C"))]
    );

    a.reconfigure(b"config-c".to_vec());
    assert!(
        !a.snapshotted(),
        "a snapshot of the old configuration is not used"
    );
    assert_eq!(
        twice(&a),
        [(v("config-c"), v("D")), (v("config-c"), v("E"))]
    );
}

/// A start that reads random bytes is not snapshotted: every instance would get the same
/// bytes. Its instances keep starting, each with bytes of its own.
#[test]
fn a_start_that_reads_random_bytes_is_not_snapshotted() {
    let wat = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  {PRELUDE}
  (func (export "_initialize") (drop (call $random (i32.const 64) (i32.const 4))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.and (i32.load8_u (i32.const 64)) (i32.const 15)))
    (call $rec (i32.and (i32.load8_u (i32.const 65)) (i32.const 15)))
    (call $rec (i32.and (i32.load8_u (i32.const 66)) (i32.const 15)))
    (call $rec (i32.and (i32.load8_u (i32.const 67)) (i32.const 15)))
    (i32.const 0)))"#
    );
    let p = plugin_with(&wat::parse_str(&wat).unwrap(), spec(Isolation::Request));
    assert!(!p.snapshotted());
    let draws: Vec<String> = (0..3).map(|_| all(&run(&p).1, "x-s").concat()).collect();
    assert!(
        draws[0] != draws[1] || draws[1] != draws[2],
        "every instance draws its own bytes: {draws:?}"
    );
}

/// A snapshot kept on disk whose bytes no longer match their digest is taken again, not
/// loaded; the module serves as before.
#[test]
fn a_corrupt_snapshot_on_disk_is_taken_again() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let load = || {
        let rt = Runtime::new(true).expect("runtime");
        rt.set_cache_dir(dir.path()).unwrap();
        let p = configured_with(&rt, "kept");
        assert!(p.snapshotted());
        assert_eq!(twice(&p)[1].0, "kept");
        rt
    };
    drop(load());
    let snap = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .expect("a snapshot on disk");
    let valid = |b: &[u8]| Sha256::digest(&b[32..]).as_slice() == &b[..32];
    let mut bytes = std::fs::read(&snap).unwrap();
    assert!(valid(&bytes));
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&snap, &bytes).unwrap();
    drop(load());
    assert!(
        valid(&std::fs::read(&snap).unwrap()),
        "taken again and kept"
    );
}

/// Instances from a snapshot are metered and limited as any: an endless loop overruns its
/// budget, memory cannot grow past `memory_mb`.
#[test]
fn snapshot_instances_keep_their_budget_and_memory_limit() {
    let endless = plugin_with(&guest("(loop $l (br $l))", ""), spec(Isolation::Request));
    assert!(endless.snapshotted());
    match run(&endless).0 {
        Outcome::Failed(f) => assert!(matches!(f.cause, Cause::Overrun), "{:?}", f.cause),
        other => panic!("expected an overrun, got {other:?}"),
    }
    let grow = plugin_with(
        &guest(
            "(call $rec (i32.add (i32.const 2) (memory.grow (i32.const 255))))
             (call $rec (i32.add (i32.const 2) (memory.grow (i32.const 254))))",
            "",
        ),
        spec(Isolation::Request),
    );
    assert!(grow.snapshotted());
    assert_eq!(all(&run(&grow).1, "x-s"), ["B", "E"]);
}

/// A guest whose start leaves state in a global (`$seen` = 2) and in memory (byte 70000
/// = 4); each request records what it finds (`$seen`, the data byte at 300, byte 70000,
/// the last byte, `$heap`'s distance from its start, the memory's size, and whether any
/// page holds a mark a request left), then changes all of it: counters up, the heap
/// moved, a mark written in every page.
fn renewable() -> Vec<u8> {
    let wat = format!(
        r#"(module {PRELUDE}
  (data (i32.const 300) "\05")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (global.set $seen (i32.const 2))
    (i32.store8 (i32.const 70000) (i32.const 4))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $i i32) (local $marks i32)
    (call $rec (global.get $seen))
    (call $rec (i32.load8_u (i32.const 300)))
    (call $rec (i32.load8_u (i32.const 70000)))
    (call $rec (i32.load8_u (i32.const 131071)))
    (call $rec (i32.sub (global.get $heap) (i32.const 65536)))
    (call $rec (memory.size))
    (loop $l
      (local.set $marks (i32.or (local.get $marks) (i32.load8_u (i32.add (local.get $i) (i32.const 2000)))))
      (i32.store8 (i32.add (local.get $i) (i32.const 2000)) (i32.const 7))
      (local.set $i (i32.add (local.get $i) (i32.const 4096)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 131072))))
    (call $rec (i32.ne (local.get $marks) (i32.const 0)))
    (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
    (global.set $heap (i32.add (global.get $heap) (i32.const 3)))
    (i32.store8 (i32.const 300) (i32.add (i32.load8_u (i32.const 300)) (i32.const 1)))
    (i32.store8 (i32.const 70000) (i32.add (i32.load8_u (i32.const 70000)) (i32.const 1)))
    (i32.store8 (i32.const 131071) (i32.add (i32.load8_u (i32.const 131071)) (i32.const 1)))
    (i32.const 0)))"#
    );
    wat::parse_str(&wat).expect("test WAT")
}

/// Under `isolation = "request"` a VM started from a snapshot is renewed after its
/// request instead of dropped: every page the request wrote is put back, every mutable
/// global set back, the host state built anew. Each request must find the module as
/// the snapshot left it, as a new instance would (a shared VM shows what renewing has to
/// undo), and renewed VMs must be what serves them.
#[test]
fn renewed_vms_start_every_request_as_the_snapshot_left_them() {
    let first = ["C", "F", "E", "A", "A", "C", "A"].map(String::from);
    // one runtime for the three (each runtime reserves its own instance pool)
    let mut rt = Runtime::new(false).expect("runtime");
    let on = |rt: &Runtime, isolation| {
        rt.plugin(spec(isolation), &renewable(), &Metrics::new())
            .expect("plugin")
    };
    let shared = on(&rt, Isolation::Shared);
    assert_eq!(all(&run(&shared).1, "x-s"), first);
    assert_eq!(
        all(&run(&shared).1, "x-s"),
        ["D", "G", "F", "B", "D", "C", "B"]
    );

    let fresh = on(&rt, Isolation::Request);
    assert!(fresh.snapshotted());
    for i in 0..6 {
        assert_eq!(all(&run(&fresh).1, "x-s"), first, "request {i}");
    }
    assert_eq!(fresh.renewals(), 6, "each request's VM renewed");

    // the same, instantiated anew for each request
    rt.set_renewal(false);
    let instantiated = on(&rt, Isolation::Request);
    for _ in 0..3 {
        assert_eq!(all(&run(&instantiated).1, "x-s"), first);
    }
    assert_eq!(instantiated.renewals(), 0);
}

/// What renewing cannot put back is not renewed: a memory that grew (a new instance
/// starts at the declared size), and a module whose code can change a table. Those VMs
/// are dropped and each request gets a new instance, as without renewal.
#[test]
fn vms_renewal_cannot_restore_are_dropped() {
    let rt = Runtime::new(false).expect("runtime");
    let grows = rt
        .plugin(
            spec(Isolation::Request),
            &guest(
                "(call $rec (memory.size)) (drop (memory.grow (i32.const 1)))",
                "",
            ),
            &Metrics::new(),
        )
        .expect("plugin");
    assert!(grows.snapshotted());
    for _ in 0..3 {
        assert_eq!(all(&run(&grows).1, "x-s"), ["C"]);
    }
    assert_eq!(grows.renewals(), 0);

    let wat = format!(
        r#"(module {PRELUDE}
  (table 2 funcref)
  (func $f)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.eqz (ref.is_null (table.get (i32.const 1)))))
    (table.set (i32.const 1) (ref.func $f))
    (i32.const 0))
  (elem declare func $f))"#
    );
    let sets = rt
        .plugin(
            spec(Isolation::Request),
            &wat::parse_str(&wat).unwrap(),
            &Metrics::new(),
        )
        .expect("plugin");
    // no snapshot either (wizer refuses table.set); renewing checks for itself too
    assert!(!sets.snapshotted());
    for _ in 0..3 {
        assert_eq!(all(&run(&sets).1, "x-s"), ["A"], "a new table each time");
    }
    assert_eq!(sets.renewals(), 0);
}

/// SDK-built guests answer the same on renewed VMs as on instances made anew: the
/// API-key guest with keys it knows and does not, missing and repeated.
#[test]
fn sdk_guests_answer_the_same_on_renewed_vms() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/guests/out/api_key_auth.wasm"
    ))
    .expect("built guests (scripts/build-guests.sh)");
    let s = || {
        let mut s = spec(Isolation::Request);
        s.config = br#"{"keys": ["k1", "k2"]}"#.to_vec();
        s
    };
    let mut rt = Runtime::new(false).expect("runtime");
    let renewed = rt.plugin(s(), &bytes, &Metrics::new()).expect("plugin");
    rt.set_renewal(false);
    let instantiated = rt.plugin(s(), &bytes, &Metrics::new()).expect("plugin");
    let keys = ["k1", "nope", "", "k2", "k1k2", "k2", "K1", "k1"];
    let answers = |p: &Arc<Plugin>| -> Vec<String> {
        keys.iter()
            .map(|k| {
                let mut req = request();
                req.remove_header("x-api-key");
                if !k.is_empty() {
                    req.insert_header("x-api-key", *k).unwrap();
                }
                let mut info = RequestInfo::default();
                let mut lease = p.try_lease().expect("lease");
                let out = lease.on_request_headers(&mut req, &mut info, true);
                lease.finish(Some(&req), None, &mut info);
                match out {
                    Outcome::Continue => "continue".to_string(),
                    Outcome::Respond(r) => format!("{} {:?}", r.status, r.body),
                    other => format!("{other:?}"),
                }
            })
            .collect()
    };
    let a = answers(&renewed);
    assert_eq!(a, answers(&instantiated));
    assert_eq!(a[0], "continue");
    assert!(a[1].starts_with("401"), "{a:?}");
    assert_eq!(renewed.renewals(), keys.len() as u64);
}

/// A snapshot is another module's only if everything its start could see or be limited
/// by is the same: two modules of the same bytes and configuration but another name,
/// tenant or memory limit each get their own (here on one runtime keeping snapshots on
/// disk, where the second used to load the first one's). The guest's start grows its
/// memory by 100 pages (refused under a 2 MiB limit) and keeps its `plugin_name`; each
/// request records whether the memory is large and shows the name kept.
#[test]
fn snapshots_are_not_shared_by_modules_that_differ_in_name_tenant_or_limits() {
    let wat = format!(
        r#"(module {PRELUDE}
  (data (i32.const 256) "plugin_name")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (memory.grow (i32.const 100)))
    (drop (call $get_property (i32.const 256) (i32.const 11) (i32.const 16) (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.gt_u (memory.size) (i32.const 50)))
    (call $show)
    (i32.const 0)))"#
    );
    let bytes = wat::parse_str(&wat).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(true).expect("runtime");
    rt.set_cache_dir(dir.path()).unwrap();
    let load = |name: &str, tenant: &str, memory_mb: u64| {
        let mut s = spec(Isolation::Request);
        s.name = name.into();
        s.tenant = tenant.into();
        s.limits.memory_bytes = memory_mb << 20;
        let p = rt.plugin(s, &bytes, &Metrics::new()).expect("plugin");
        assert!(p.snapshotted(), "{name}");
        p
    };
    let answer = |p: &Arc<Plugin>| {
        let (out, req) = run(p);
        assert!(matches!(out, Outcome::Continue), "{out:?}");
        (all(&req, "x-s").concat(), all(&req, "x-v").concat())
    };
    let one = load("one", "t1", 16);
    let two = load("two", "t1", 16);
    let other = load("one", "t2", 16);
    let small = load("small", "t1", 2);
    for _ in 0..2 {
        assert_eq!(answer(&one), ("B".into(), "one".into()));
        assert_eq!(answer(&two), ("B".into(), "two".into()));
        assert_eq!(answer(&other), ("B".into(), "one".into()));
        assert_eq!(answer(&small), ("A".into(), "small".into()));
    }
    let snaps = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "snap")
        })
        .count();
    assert_eq!(snaps, 4, "one snapshot per module");
}
