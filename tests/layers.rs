//! The library's layers import downward only: every `crate::` path in `src/` is resolved to the
//! file that defines it (following `pub use` re-exports of a module's `mod.rs`), and that file's
//! layer must lie below the importing file's layer, or be in the same module. The table is the
//! one `docs/architecture.md` shows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Files (or folders, ending in `/`) of `src/` by layer, bottom first.
const LAYERS: &[&[&str]] = &[
    &["hparams.rs", "gguf/", "mcp/"],
    &["lora/mod.rs"],
    &["error.rs"],
    &["gpu/", "text/"],
    &["kernels/"],
    &["kv.rs", "lora/registry.rs"],
    &["model/"],
    &["decode/", "batch.rs"],
    &["session.rs", "reference/"],
    &["toolcall/", "engine.rs"],
    &["train/", "eval/"],
    &["agent.rs", "serve/"],
    &["lib.rs"],
];

fn layer_of(file: &str) -> usize {
    let hit = LAYERS.iter().position(|l| l.iter().any(|p| if p.ends_with('/') { file.starts_with(p) } else { file == *p }));
    hit.unwrap_or_else(|| panic!("src/{file} is in no layer: add it to LAYERS and docs/architecture.md"))
}

/// The module a file belongs to (its first path component).
fn module_of(file: &str) -> &str {
    file.split('/').next().unwrap().trim_end_matches(".rs")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Items a module's `mod.rs` re-exports from its submodules (`pub use sub::{A, B};`), by name.
fn re_exports(src: &Path, module: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(src.join(module).join("mod.rs")) else { return out };
    for line in text.lines().filter_map(|l| l.trim().strip_prefix("pub use ")) {
        let Some((sub, items)) = line.split_once("::") else { continue };
        if sub == "crate" {
            continue;
        }
        for item in items.trim_end_matches(';').trim_matches(['{', '}']).split(',') {
            out.insert(item.trim().to_string(), format!("{module}/{sub}.rs"));
        }
    }
    out
}

/// The file a `crate::a::b…` path names (`a`, then `b` where `a` is a folder).
fn target(src: &Path, path: &[&str]) -> String {
    let root_items = [
        ("Error", "error.rs"),
        ("Result", "error.rs"),
        ("Engine", "engine.rs"),
        ("Completion", "engine.rs"),
        ("resolve_model", "engine.rs"),
        ("model_cache_dir", "engine.rs"),
        ("Agent", "agent.rs"),
        ("AgentBuilder", "agent.rs"),
    ];
    if let Some((_, f)) = root_items.iter().find(|(n, _)| *n == path[0]) {
        return f.to_string();
    }
    let m = path[0];
    if src.join(format!("{m}.rs")).is_file() {
        return format!("{m}.rs");
    }
    let next = path.get(1).copied().unwrap_or("");
    if src.join(m).join(format!("{next}.rs")).is_file() {
        return format!("{m}/{next}.rs");
    }
    if src.join(m).join(next).is_dir() {
        return format!("{m}/{next}/");
    }
    re_exports(src, m).get(next).cloned().unwrap_or(format!("{m}/mod.rs"))
}

/// Every `crate::` path of a file's code (comments and the unit tests at its end skipped: tests
/// may use the f32 reference from any layer).
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':' || *c == '{').collect();
            let path = path.trim_end_matches([':', '{']);
            let parts: Vec<String> = path.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            if !parts.is_empty() {
                out.push(parts);
            }
        }
    }
    out
}

#[test]
fn layers_import_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for path in &files {
        let file = path.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        // The binary is a crate of its own over the public API: its `crate::` is itself.
        if file.starts_with("bin/") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let from = layer_of(&file);
        for p in crate_paths(&text) {
            let parts: Vec<&str> = p.iter().map(String::as_str).collect();
            let to_file = target(&src, &parts);
            checked += 1;
            if module_of(&to_file) == module_of(&file) {
                continue;
            }
            let to = layer_of(&to_file);
            if to >= from {
                wrong.push(format!("src/{file} (layer {from}) imports crate::{} from src/{to_file} (layer {to})", p.join("::")));
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found: the scan is broken");
    assert!(wrong.is_empty(), "imports that point up or sideways:\n{}", wrong.join("\n"));
}
