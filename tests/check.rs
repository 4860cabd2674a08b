//! `wasmgate check` on every shipped conf (must pass) and on every conf in
//! `tests/ui/invalid/` (must fail with exactly the error text in the `.stderr` file next
//! to it). Set `BLESS=1` to rewrite the expected files after an intended change.

mod common;

use std::path::Path;
use std::process::Command;

fn check(conf: &Path) -> (bool, String, String) {
    let out = Command::new(common::bin())
        .args(["check", "--config"])
        .arg(conf)
        .current_dir(common::repo())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_conf_passes_check() {
    common::guests();
    let mut n = 0;
    for e in std::fs::read_dir(common::repo().join("conf")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let rel = p.strip_prefix(common::repo()).unwrap();
            let (ok, out, err) = check(rel);
            assert!(ok, "{} failed check:\n{err}", rel.display());
            // the result and nothing else: no log lines before it, nothing on stderr
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(out.contains(": ok: "), "{out}");
            assert_eq!(err, "", "check printed more than its result");
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn invalid_confs_fail_with_their_expected_errors() {
    common::guests();
    let dir = Path::new("tests/ui/invalid");
    let bless = std::env::var_os("BLESS").is_some();
    let mut n = 0;
    let mut mismatches = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(common::repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    for p in entries {
        let rel = dir.join(p.file_name().unwrap());
        let (ok, _, err) = check(&rel);
        assert!(!ok, "{} passed check but must not", rel.display());
        // only the errors: no log lines (module loading, guest logs) around them
        assert!(
            err.lines().all(|l| l.starts_with("error: ")),
            "{}: more than errors on stderr:\n{err}",
            rel.display()
        );
        let expected_path = p.with_extension("stderr");
        if bless {
            std::fs::write(&expected_path, &err).unwrap();
        } else {
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
                panic!("missing {}; run with BLESS=1", expected_path.display())
            });
            if expected != err {
                mismatches.push(format!(
                    "{}:\n--- expected\n{expected}--- got\n{err}",
                    rel.display()
                ));
            }
        }
        n += 1;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(n >= 5);
}
