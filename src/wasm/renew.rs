//! Fresh instances without instantiating: a VM started from a snapshot is put back, after
//! its request, in the state the snapshot starts every instance in.
//!
//! Under `isolation = "request"` each request must find the module as its snapshot left
//! it. A new instance per request gives that, at the price of wasmtime's instantiation, a
//! new store and a slot reset. What a guest can observe of its instance is its linear
//! memory, its globals and its tables (and, through the host, its contexts). So a VM
//! whose request ended can be *renewed* instead:
//!
//! - the memory pages the request wrote are found with Linux's `PAGEMAP_SCAN` (pages
//!   present or swapped that are neither the shared zero page nor the snapshot image's
//!   own file page: a write to a copy-on-write mapping always makes a private page) and
//!   copied back from the snapshot's memory, kept page by page when the code's first VM
//!   starts (before any guest code ran in it);
//! - every mutable global is set back to the value it started with (the snapshot module
//!   is rewritten to export them, [`prepare`]);
//! - the host state is built anew, as for a new store.
//!
//! Only modules where that is the whole state are renewed: no imported memory, table or
//! global, one memory, no start function, and no instruction that changes a table or
//! drops a segment (`table.set`/`grow`/`fill`/`copy`/`init`, `elem.drop`, `data.drop`).
//! A VM whose memory grew, that failed, or whose scan fails is dropped, and the next
//! request gets a new instance, as before.

use std::ops::Range;
use wasmtime::{Global, Memory, Store, Val};

/// The export a renewable snapshot carries (its memory, once more), and the prefix of its
/// mutable globals' exports.
pub(crate) const MARK: &str = "wasmgate:renew";
const GLOBAL_PREFIX: &str = "wasmgate:global:";
const PAGE: usize = 4096;

/// `bytes` (a snapshot) with its mutable globals exported for renewal and the [`MARK`]
/// export, or why its instances cannot be renewed.
pub(crate) fn prepare(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use wasmparser::{ExternalKind, Operator, Parser, Payload, TypeRef};
    let mut mutable = Vec::new();
    let mut memories = 0;
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ImportSection(s) => {
                for import in s.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    if !matches!(import.ty, TypeRef::Func(_)) {
                        return Err("it imports more than functions".into());
                    }
                }
            }
            Payload::MemorySection(s) => {
                for m in s {
                    if m.map_err(|e| e.to_string())?.shared {
                        return Err("its memory is shared".into());
                    }
                    memories += 1;
                }
            }
            Payload::GlobalSection(s) => {
                for (i, g) in s.into_iter().enumerate() {
                    if g.map_err(|e| e.to_string())?.ty.mutable {
                        mutable.push(i as u32);
                    }
                }
            }
            Payload::StartSection { .. } => return Err("it has a start function".into()),
            Payload::ExportSection(s) => {
                for e in s {
                    let e = e.map_err(|e| e.to_string())?;
                    exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            Payload::CodeSectionEntry(body) => {
                let mut ops = body.get_operators_reader().map_err(|e| e.to_string())?;
                while !ops.eof() {
                    match ops.read().map_err(|e| e.to_string())? {
                        Operator::TableSet { .. }
                        | Operator::TableGrow { .. }
                        | Operator::TableFill { .. }
                        | Operator::TableCopy { .. }
                        | Operator::TableInit { .. }
                        | Operator::ElemDrop { .. }
                        | Operator::DataDrop { .. } => {
                            return Err("its code changes a table or drops a segment".into())
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if memories != 1 {
        return Err("it does not define exactly one memory".into());
    }
    if exports
        .iter()
        .any(|(name, ..)| name.starts_with("wasmgate:"))
    {
        return Err("it exports names of the gateway's own".into());
    }
    // the same sections, the export section with the additions
    let mut out = wasm_encoder::Module::new();
    let mut exported = false;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| e.to_string())?;
        let Some((id, range)) = payload.as_section() else {
            continue;
        };
        if let Payload::ExportSection(_) = payload {
            let mut s = wasm_encoder::ExportSection::new();
            for (name, kind, index) in &exports {
                s.export(name, export_kind(*kind), *index);
            }
            s.export(MARK, wasm_encoder::ExportKind::Memory, 0);
            for g in &mutable {
                s.export(
                    &format!("{GLOBAL_PREFIX}{g}"),
                    wasm_encoder::ExportKind::Global,
                    *g,
                );
            }
            out.section(&s);
            exported = true;
        } else {
            out.section(&wasm_encoder::RawSection {
                id,
                data: &bytes[range],
            });
        }
    }
    if !exported {
        return Err("it has no export section".into());
    }
    Ok(out.finish())
}

fn export_kind(k: wasmparser::ExternalKind) -> wasm_encoder::ExportKind {
    use wasm_encoder::ExportKind as E;
    use wasmparser::ExternalKind as K;
    match k {
        K::Func | K::FuncExact => E::Func,
        K::Table => E::Table,
        K::Memory => E::Memory,
        K::Global => E::Global,
        K::Tag => E::Tag,
    }
}

/// What renewing a VM of one code puts back: the memory and globals its instances start
/// with. Taken from the code's first instance, before any guest code ran in it.
pub(crate) struct Pristine {
    /// The memory, page by page (`None`: all zeros).
    pages: Box<[Option<Box<[u8]>>]>,
    len: usize,
    /// The mutable globals' exports and their first values.
    globals: Box<[(wasmtime::ModuleExport, Val)]>,
}

impl Pristine {
    /// The pristine state of `instance` (a snapshot's instance no code has run in), if its
    /// module was [`prepare`]d and the scan works here.
    pub(crate) fn take<T>(
        store: &mut Store<T>,
        instance: wasmtime::Instance,
        module: &wasmtime::Module,
    ) -> Option<Pristine> {
        module.get_export_index(MARK)?;
        pagemap()?;
        let memory = instance.get_export(&mut *store, MARK)?.into_memory()?;
        let mut globals = Vec::new();
        for export in module.exports() {
            if !export.name().starts_with(GLOBAL_PREFIX) {
                continue;
            }
            let at = module.get_export_index(export.name())?;
            let g = instance
                .get_module_export(&mut *store, &at)?
                .into_global()?;
            globals.push((at, g.get(&mut *store)));
        }
        let data = memory.data(&*store);
        let pages = data
            .chunks(PAGE)
            .map(|p| (!p.iter().all(|&b| b == 0)).then(|| p.into()))
            .collect();
        Some(Pristine {
            pages,
            len: data.len(),
            globals: globals.into(),
        })
    }

    /// The handles a VM of `instance` needs to be renewed: its memory and mutable globals.
    pub(crate) fn handles<T>(
        &self,
        store: &mut Store<T>,
        instance: wasmtime::Instance,
    ) -> Option<Handles> {
        let memory = instance.get_export(&mut *store, MARK)?.into_memory()?;
        let globals = self
            .globals
            .iter()
            .map(|(at, _)| instance.get_module_export(&mut *store, at)?.into_global())
            .collect::<Option<_>>()?;
        Some(Handles { memory, globals })
    }

    /// Puts the memory and globals `h` names back as they started. `false` (nothing to
    /// trust then) when the memory grew or the scan failed.
    pub(crate) fn restore<T>(&self, store: &mut Store<T>, h: &Handles) -> bool {
        let mem = h.memory.data_mut(&mut *store);
        if mem.len() != self.len {
            return false;
        }
        let base = mem.as_mut_ptr();
        let scanned = written(base, mem.len(), |bytes| {
            for at in bytes.step_by(PAGE) {
                let end = (at + PAGE).min(mem.len());
                match &self.pages[at / PAGE] {
                    Some(p) => mem[at..end].copy_from_slice(&p[..end - at]),
                    None => mem[at..end].fill(0),
                }
            }
        });
        if !scanned {
            return false;
        }
        for (g, (_, v)) in h.globals.iter().zip(&self.globals[..]) {
            if g.set(&mut *store, *v).is_err() {
                return false;
            }
        }
        true
    }
}

/// A VM's memory and mutable globals, for [`Pristine::restore`].
pub(crate) struct Handles {
    memory: Memory,
    globals: Box<[Global]>,
}

/// `/proc/self/pagemap`, if `PAGEMAP_SCAN` works on it (Linux 6.7+).
fn pagemap() -> Option<&'static std::fs::File> {
    static PAGEMAP: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    PAGEMAP
        .get_or_init(|| {
            let f = std::fs::File::open("/proc/self/pagemap").ok()?;
            let page = [0u8; PAGE * 2];
            let at = page.as_ptr().align_offset(PAGE);
            let mut n = 0;
            scan(&f, page[at..].as_ptr() as u64, PAGE as u64, |_| n += 1)
                .ok()
                .map(|_| f)
        })
        .as_ref()
}

/// Calls `each` with the ranges of `base..base + len` (as offsets from `base`, whole
/// pages) that were written; `false` if it could not tell.
fn written(base: *mut u8, len: usize, mut each: impl FnMut(Range<usize>)) -> bool {
    let Some(f) = pagemap() else { return false };
    let origin = base as u64;
    scan(f, origin, len as u64, |r| {
        each((r.start - origin) as usize..(r.end - origin) as usize)
    })
    .is_ok()
}

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `_IOWR('f', 16, struct pm_scan_arg)`
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

/// The address ranges in `start..start + len` holding pages a write made private: present
/// or swapped out, and neither the zero page nor a page of a file (the snapshot image).
fn scan(
    f: &std::fs::File,
    start: u64,
    len: u64,
    mut each: impl FnMut(Range<u64>),
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const REGIONS: usize = 32;
    let end = start + len;
    let mut at = start;
    while at < end {
        let mut regions = [PageRegion::default(); REGIONS];
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: REGIONS as u64,
            max_pages: 0,
            category_inverted: PAGE_IS_FILE | PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_FILE | PAGE_IS_PFNZERO,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: 0,
        };
        // SAFETY: the kernel reads `arg` and writes at most `vec_len` regions into
        // `regions`, both alive for the call; it only reads the page tables of the range.
        let n = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for r in &regions[..(n as usize).min(REGIONS)] {
            each(r.start..r.end);
        }
        if arg.walk_end <= at {
            return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_written_pages_and_only_those() {
        let Some(f) = pagemap() else {
            eprintln!("no PAGEMAP_SCAN here");
            return;
        };
        let len = 16 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mem = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
        let read: u32 = mem[5 * PAGE..6 * PAGE].iter().map(|&b| b as u32).sum();
        assert_eq!(read, 0); // read: the zero page, not written
        mem[3 * PAGE + 7] = 1;
        mem[4 * PAGE] = 1;
        mem[9 * PAGE + 4095] = 1;
        let mut found = Vec::new();
        scan(f, base as u64, len as u64, |r| {
            found.push(
                ((r.start - base as u64) as usize / PAGE)..((r.end - base as u64) as usize / PAGE),
            )
        })
        .unwrap();
        assert_eq!(found, vec![3..5, 9..10]);
        unsafe { libc::munmap(base, len) };
    }

    fn module(body: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
  (memory (export "memory") 1)
  (global $a (mut i32) (i32.const 1))
  (global $b i32 (i32.const 2))
  (global $c (mut i64) (i64.const 3))
  {body})"#
        ))
        .unwrap()
    }

    #[test]
    fn prepared_snapshots_export_their_mutable_globals() {
        let out = prepare(&module(r#"(func (export "f"))"#)).unwrap();
        wasmparser::Validator::new().validate_all(&out).unwrap();
        let mut names = Vec::new();
        for p in wasmparser::Parser::new(0).parse_all(&out) {
            if let wasmparser::Payload::ExportSection(s) = p.unwrap() {
                for e in s {
                    let e = e.unwrap();
                    names.push((e.name.to_string(), e.index));
                }
            }
        }
        let expect = [("memory", 0), ("f", 0), (MARK, 0)];
        let mut expect: Vec<_> = expect.iter().map(|(n, i)| (n.to_string(), *i)).collect();
        expect.push((format!("{GLOBAL_PREFIX}0"), 0));
        expect.push((format!("{GLOBAL_PREFIX}2"), 2));
        assert_eq!(names, expect);
    }

    #[test]
    fn what_renewal_cannot_restore_is_refused() {
        for (body, why) in [
            (
                "(table 1 funcref) (func (table.set (i32.const 0) (ref.null func)))",
                "table",
            ),
            (
                "(table 1 funcref) (func (drop (table.grow (ref.null func) (i32.const 1))))",
                "table",
            ),
            ("(data $d \"x\") (func (data.drop $d))", "segment"),
            ("(func $s) (start $s)", "start"),
            (r#"(func (export "wasmgate:renew"))"#, "gateway"),
        ] {
            let err = prepare(&module(body)).unwrap_err();
            assert!(err.contains(why), "{body}: {err}");
        }
        let imports = r#"(module (import "env" "g" (global i32)) (memory 1))"#;
        let err = prepare(&wat::parse_str(imports).unwrap()).unwrap_err();
        assert!(err.contains("imports"), "{err}");
        let two = "(module (memory 1) (memory 1))";
        let err = prepare(&wat::parse_str(two).unwrap()).unwrap_err();
        assert!(err.contains("one memory"), "{err}");
    }
}
