//! `wasmgate deploy` from source: a JavaScript file (componentize-js), a Python file
//! (componentize-py) or a Rust crate directory (`cargo build --target wasm32-wasip2`)
//! becomes a WASI-HTTP component on this machine, then is deployed like any module. The
//! JavaScript and Python toolchains are installed, pinned, into a cache directory
//! (`$WASMGATE_TOOLS`, by default `~/.cache/wasmgate-tools`) the first time; any other
//! file (a `.wasm` module or component) is uploaded as it is.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The componentize-js release the gateway is tested with.
pub const COMPONENTIZE_JS_VERSION: &str = "0.23.0";
/// The componentize-py release the gateway is tested with.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
/// The wasi:http WIT ships with this crate (the host's own interfaces).
const WASI_HTTP_CRATE: &str = "wasmtime-wasi-http-48.0.8";
/// The state interfaces the gateway grants functions (`wasi:keyvalue`, `wasi:config`):
/// part of the world sources are built against, so a JavaScript or Python function can
/// import them.
const KEYVALUE_WIT: &str = include_str!("../../wit/host/deps/keyvalue/store.wit");
const CONFIG_WIT: &str = include_str!("../../wit/host/deps/config/store.wit");
/// The world JavaScript and Python sources are built against: wasi:http/proxy and the
/// state interfaces.
const FUNCTION_WORLD: &str = "wasmgate:function/function";
/// Builds a JavaScript fetch handler with componentize-js (see the script's header).
const COMPONENTIZE_MJS: &str = include_str!("../../guests/components/componentize.mjs");

/// The component `source` stands for: its bytes, built if it is source.
pub fn build(source: &Path) -> Result<Vec<u8>, String> {
    let ext = source.extension().and_then(|e| e.to_str()).unwrap_or("");
    let out = if source.is_dir() {
        rust(source)?
    } else {
        match ext {
            "js" | "mjs" => javascript(source)?,
            "py" => python(source)?,
            // anything else goes as it is: the gateway says what it is not
            _ => source.to_path_buf(),
        }
    };
    let bytes = std::fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()));
    if out != source && out.starts_with(tools().join("build")) {
        let _ = std::fs::remove_file(&out); // built for this deploy only
    }
    bytes
}

fn tools() -> PathBuf {
    match std::env::var_os("WASMGATE_TOOLS") {
        Some(d) => PathBuf::from(d),
        None => home().join(".cache/wasmgate-tools"),
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// Runs `cmd`, turning a missing program or a failure into a message with its output.
fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| {
        format!(
            "{what}: cannot run `{}` ({e}); is it installed?",
            cmd.get_program().to_string_lossy()
        )
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn output_file(source: &Path) -> Result<PathBuf, String> {
    let dir = tools().join("build");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let stem = source.file_stem().and_then(|s| s.to_str()).unwrap_or("app");
    Ok(dir.join(format!("{stem}-{}.wasm", std::process::id())))
}

fn javascript(source: &Path) -> Result<PathBuf, String> {
    let npm = tools().join("npm");
    let pkg = npm.join("node_modules/@bytecodealliance/componentize-js/package.json");
    let installed = std::fs::read_to_string(&pkg)
        .is_ok_and(|p| p.contains(&format!("\"version\": \"{COMPONENTIZE_JS_VERSION}\"")));
    if !installed {
        eprintln!(
            "installing componentize-js {COMPONENTIZE_JS_VERSION} into {}",
            npm.display()
        );
        std::fs::create_dir_all(&npm).map_err(|e| e.to_string())?;
        run(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&npm)
                .arg(format!(
                    "@bytecodealliance/componentize-js@{COMPONENTIZE_JS_VERSION}"
                )),
            "npm install",
        )?;
    }
    let script = tools().join("componentize.mjs");
    std::fs::write(&script, COMPONENTIZE_MJS).map_err(|e| e.to_string())?;
    let wit = js_wit()?;
    let out = output_file(source)?;
    run(
        Command::new("node")
            .arg(&script)
            .arg(&npm)
            .arg(source)
            .arg(&out)
            .arg(&wit)
            .arg(FUNCTION_WORLD),
        "componentize-js",
    )?;
    Ok(out)
}

fn python(source: &Path) -> Result<PathBuf, String> {
    let prefix = tools()
        .join("py")
        .join(format!("componentize-py-{COMPONENTIZE_PY_VERSION}"));
    let bin = prefix.join("bin/componentize-py");
    if !bin.exists() {
        eprintln!(
            "installing componentize-py {COMPONENTIZE_PY_VERSION} into {}",
            prefix.display()
        );
        run(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&prefix)
                .arg(format!("componentize-py=={COMPONENTIZE_PY_VERSION}")),
            "pip install",
        )?;
    }
    let dir = source
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let module = source.file_stem().and_then(|s| s.to_str()).unwrap_or("app");
    let out = output_file(source)?;
    run(
        Command::new(&bin)
            .env("PYTHONPATH", &prefix)
            .current_dir(dir)
            .arg("-d")
            .arg(function_wit("0.2.12")?)
            .args(["-w", FUNCTION_WORLD, "componentize", module, "-o"])
            .arg(&out),
        "componentize-py",
    )?;
    Ok(out)
}

fn rust(dir: &Path) -> Result<PathBuf, String> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        return Err(format!(
            "{}: not a Rust crate (no Cargo.toml)",
            dir.display()
        ));
    }
    let _ = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .output();
    // cargo says where it put the artifact (a workspace member builds into the
    // workspace's target dir): read its JSON messages rather than guessing the path
    let out = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build failed ({})", out.status));
    }
    let wasm = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .flat_map(|m| {
            let files = m["filenames"].as_array().cloned().unwrap_or_default();
            files
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .rfind(|p| p.extension().is_some_and(|x| x == "wasm"));
    wasm.ok_or_else(|| {
        format!(
            "cargo built no .wasm for {} (a function crate needs crate-type = [\"cdylib\"])",
            dir.display()
        )
    })
}

/// The host's wasi:http WIT (0.2.12), from the crate that implements it, in cargo's
/// registry (where building wasmgate put it).
fn wasi_http_wit() -> Result<PathBuf, String> {
    let registry = std::env::var_os("CARGO_HOME")
        .map_or_else(|| home().join(".cargo"), PathBuf::from)
        .join("registry/src");
    let found = std::fs::read_dir(&registry)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(WASI_HTTP_CRATE).join("wit"))
        .find(|p| p.is_dir());
    found.ok_or_else(|| {
        format!("the wasi:http WIT of {WASI_HTTP_CRATE} is not in {}: run `cargo fetch` in the wasmgate checkout", registry.display())
    })
}

/// StarlingMonkey (componentize-js 0.23) exports `wasi:http/incoming-handler@0.2.10`, so
/// its world must name 0.2.10: the host's WIT with that version, less what 0.2.11 and
/// 0.2.12 added (the host accepts any 0.2.x).
fn js_wit() -> Result<PathBuf, String> {
    function_wit("0.2.10")
}

/// The WIT of [`FUNCTION_WORLD`] with wasi:http at `http` (0.2.12 as the host has it, or
/// 0.2.10 for StarlingMonkey, see [`downgrade`]): the host's wasi:http packages, the state
/// packages, and a root package whose world includes them.
fn function_wit(http: &str) -> Result<PathBuf, String> {
    let from = wasi_http_wit()?;
    let to = tools().join(format!("wit/function-{http}"));
    let _ = std::fs::remove_dir_all(&to);
    let prepare = || -> std::io::Result<()> {
        let deps = to.join("deps");
        if http == "0.2.12" {
            copy_wit_as_is(&from.join("deps"), &deps)?;
        } else {
            copy_wit(&from.join("deps"), &deps)?;
        }
        std::fs::write(deps.join("keyvalue.wit"), KEYVALUE_WIT)?;
        std::fs::write(deps.join("config.wit"), CONFIG_WIT)?;
        std::fs::write(
            to.join("world.wit"),
            format!(
                "package wasmgate:function;\n\nworld function {{\n  include wasi:http/proxy@{http};\n  include wasi:keyvalue/imports@0.2.0-draft;\n  include wasi:config/imports@0.2.0-rc.1;\n}}\n"
            ),
        )
    };
    prepare().map_err(|e| format!("cannot prepare the WIT in {}: {e}", to.display()))?;
    Ok(to)
}

fn copy_wit_as_is(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "wit") {
            std::fs::copy(&p, to.join(p.file_name().unwrap_or_default()))?;
        }
    }
    Ok(())
}

fn copy_wit(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        let dest = to.join(p.file_name().unwrap_or_default());
        if p.is_dir() {
            copy_wit(&p, &dest)?;
        } else if p.extension().is_some_and(|x| x == "wit") {
            std::fs::write(&dest, downgrade(&std::fs::read_to_string(&p)?))?;
        }
    }
    Ok(())
}

/// Drops each `@since(version = 0.2.11|0.2.12)` gate with the line it gates, and names
/// 0.2.10 where the WIT says 0.2.12.
fn downgrade(wit: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in wit.lines() {
        if skip {
            skip = false;
            continue;
        }
        let t = line.trim();
        if t.starts_with("@since(version = 0.2.11)") || t.starts_with("@since(version = 0.2.12)") {
            skip = true;
            continue;
        }
        out.push_str(&line.replace("@0.2.12", "@0.2.10"));
        out.push('\n');
    }
    out
}
