//! The layering of src/, checked by reading the source.
//!
//! The layer order is declared once, in the ```text block under "## Layers" in
//! src/lib.rs's module doc: one layer per line, top first, modules separated
//! by commas left of a `|`. docs/ARCHITECTURE.md carries the same block. A
//! module may import modules of its own layer or of layers below it; there is
//! no cycle between top-level modules; protobuf and tonic appear only in the
//! layers that speak gRPC; config imports nothing but error types; outside
//! its own folder a backbone family (bert, llama, vision) is named only by
//! the catalog and the few files `FAMILY_NAMERS` lists with their reason.

// Helpers outside `#[test]` functions unwrap too: a panic there fails the
// test that called them, with the message saying what was missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Modules that may name protobuf or tonic types: the transport, the wire
/// conversions, the generated contract, and the clients and tools that talk
/// gRPC like any client.
const GRPC_MODULES: [&str; 7] = [
    "server",
    "wire",
    "proto",
    "client",
    "loadgen",
    "bench",
    "fuzz_targets",
];

/// External crates that are the gRPC stack.
const GRPC_CRATES: [&str; 5] = [
    "tonic::",
    "tonic_health::",
    "tonic_reflection::",
    "prost::",
    "prost_types::",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of the first ```text block after `heading` in `text`.
fn layer_block(text: &str, heading: &str) -> Vec<String> {
    let after = text
        .split_once(heading)
        .unwrap_or_else(|| panic!("no `{heading}` section"))
        .1;
    let mut lines = Vec::new();
    let mut inside = false;
    for line in after.lines() {
        let line = line.trim_start_matches("//!").trim();
        if line == "```text" {
            inside = true;
        } else if line == "```" && inside {
            return lines;
        } else if inside {
            lines.push(line.to_owned());
        }
    }
    panic!("the `{heading}` section has no ```text block");
}

/// Module name -> rank (0 is the top layer).
fn declared_layers(block: &[String]) -> BTreeMap<String, usize> {
    let mut ranks = BTreeMap::new();
    for (rank, line) in block.iter().enumerate() {
        let (modules, _) = line
            .split_once('|')
            .unwrap_or_else(|| panic!("layer line without `|`: {line}"));
        for module in modules.split(',').map(str::trim) {
            assert!(
                ranks.insert(module.to_owned(), rank).is_none(),
                "module `{module}` is declared in two layers"
            );
        }
    }
    ranks
}

fn lib_layers() -> (Vec<String>, BTreeMap<String, usize>) {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).expect("src/lib.rs");
    let block = layer_block(&lib, "## Layers");
    let ranks = declared_layers(&block);
    (block, ranks)
}

/// Every .rs file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to, and its module path inside it
/// (for resolving `super::`).
fn module_of(file: &Path) -> (String, Vec<String>) {
    let relative = file.strip_prefix(root().join("src")).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    (parts[0].clone(), parts)
}

/// The source without comments, so that prose mentioning `crate::x` counts
/// for nothing. String literals stay: none of ours spells an import.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The first segment of each item of a `{ ... }` group that starts at `text`.
fn group_heads(text: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    item_start = true;
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                item_start = true;
                continue;
            }
            _ => {}
        }
        if depth == 1 && item_start && !c.is_whitespace() {
            item_start = false;
            let ident = ident_at(&text[i..]);
            if !ident.is_empty() && ident != "self" {
                heads.push(ident.to_owned());
            }
        }
    }
    heads
}

/// Top-level modules that `code` refers to through `crate::` paths. (No
/// module reaches the crate root through `super::`; a test below keeps it so.)
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        if at > 0 && code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `tlserve_crate::` and the like
        }
        let rest = &code[at + "crate::".len()..];
        if rest.starts_with('{') {
            found.extend(group_heads(rest));
        } else {
            found.insert(ident_at(rest).to_owned());
        }
    }
    found
}

struct Source {
    module: String,
    /// 1 for src/x.rs and src/x/mod.rs, 2 for src/x/y.rs, ...
    depth: usize,
    file: PathBuf,
    code: String,
    imports: BTreeSet<String>,
}

/// The library's files: not the crate roots, and not src/cli/, the modules of
/// the `tlserve` binary (declared by src/main.rs), which stands above every
/// layer and uses the library through `tlserve::`.
fn sources() -> Vec<Source> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    let cli = root().join("src/cli");
    files
        .into_iter()
        .filter(|f| !f.ends_with("src/lib.rs") && !f.ends_with("src/main.rs"))
        .filter(|f| !f.starts_with(&cli))
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("read");
            let code = code_of(&text);
            let (module, path) = module_of(&file);
            let imports = imports(&code)
                .into_iter()
                .filter(|m| *m != module && m != "Error" && m != "Result")
                .collect();
            Source {
                module,
                depth: path.len(),
                file,
                code,
                imports,
            }
        })
        .collect()
}

#[test]
fn every_module_is_in_exactly_one_declared_layer() {
    let (_, ranks) = lib_layers();
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).expect("lib.rs");
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    let layered: BTreeSet<String> = ranks.keys().cloned().collect();
    assert_eq!(
        declared, layered,
        "the modules of src/lib.rs and the layers in its doc differ"
    );
}

#[test]
fn the_docs_show_the_same_layers_as_lib_rs() {
    let (block, _) = lib_layers();
    let doc =
        std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    assert_eq!(
        layer_block(&doc, "## Layers"),
        block,
        "docs/ARCHITECTURE.md's layer block must equal src/lib.rs's"
    );
}

#[test]
fn imports_point_down_the_declared_layers() {
    let (_, ranks) = lib_layers();
    let mut violations = Vec::new();
    for source in sources() {
        let own = ranks[&source.module];
        for import in &source.imports {
            match ranks.get(import) {
                Some(&rank) if rank < own => violations.push(format!(
                    "{} ({}) imports `{import}`, a layer above it",
                    source.file.display(),
                    source.module
                )),
                Some(_) => {}
                None => violations.push(format!(
                    "{} imports `crate::{import}`, which no layer declares",
                    source.file.display()
                )),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn no_cycle_between_top_level_modules() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in sources() {
        graph
            .entry(source.module.clone())
            .or_default()
            .extend(source.imports);
    }
    // Depth-first search; a node met again while on the stack closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("cycle between modules: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn only_the_grpc_layers_know_protobuf_and_tonic() {
    let mut violations = Vec::new();
    for source in sources() {
        if GRPC_MODULES.contains(&source.module.as_str()) {
            continue;
        }
        for krate in GRPC_CRATES {
            let used = source.code.match_indices(krate).any(|(at, _)| {
                at == 0 || !source.code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            }) || source
                .code
                .contains(&format!("use {}", krate.trim_end_matches("::")));
            if used {
                violations.push(format!("{} uses {krate}", source.file.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn config_imports_nothing_but_error_types() {
    for source in sources().iter().filter(|s| s.module == "config") {
        let domain: Vec<&String> = source.imports.iter().filter(|m| *m != "error").collect();
        assert!(
            domain.is_empty(),
            "{} imports {domain:?}: config must stay plain data",
            source.file.display()
        );
    }
}

#[test]
fn no_module_climbs_to_the_crate_root_through_super() {
    // Outside a file's own `mod tests`, `super::` repeated as deep as the file
    // sits would name the crate root and hide an import from the checks above.
    for source in sources() {
        let climb = "super::".repeat(source.depth);
        let outside_tests = source.code.split("#[cfg(test)]").next().unwrap_or_default();
        let climbs = outside_tests
            .match_indices(&climb)
            .any(|(at, _)| !outside_tests[..at].ends_with("super::"));
        assert!(
            !climbs,
            "{} reaches the crate root with `{climb}`: write `crate::`",
            source.file.display()
        );
    }
}

/// The backbone families: folders of src/backbone/ that the catalog maps
/// architectures to.
const FAMILIES: [&str; 3] = ["bert", "llama", "vision"];

/// Files outside the families that may name one, and why. The catalog maps
/// architectures to families; backbone/mod.rs declares them and re-exports
/// what every family shares. Fine-tuning trains BERT's graph and stores
/// BERT adapters, so its loop, the head store's record of them, the
/// registry's trainable copy and its benchmark name `bert`; nothing else
/// does, so a second family to fine-tune comes through here.
const FAMILY_NAMERS: [(&str, &[&str]); 6] = [
    ("src/backbone/catalog.rs", &FAMILIES),
    ("src/backbone/mod.rs", &FAMILIES),
    ("src/fine_tune/", &["bert"]),
    ("src/head/store/layout.rs", &["bert"]),
    ("src/registry.rs", &["bert"]),
    ("src/bench/fine_tune.rs", &["bert"]),
];

/// The families `code` names: `backbone::bert` paths, `bert` inside a
/// `backbone::{...}` group and, for files of src/backbone/ itself, the
/// relative `super::bert` and bare `bert::` forms.
fn families_named(code: &str, in_backbone: bool) -> BTreeSet<&'static str> {
    let mut named = BTreeSet::new();
    let mut prefixes = vec!["backbone::"];
    if in_backbone {
        prefixes.extend(["super::", "use ", "    "]);
    }
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            let heads = if rest.starts_with('{') {
                group_heads(rest)
            } else {
                vec![ident_at(rest).to_owned()]
            };
            for family in FAMILIES {
                let path = heads.iter().any(|h| h == family)
                    && (rest.starts_with('{') || rest[family.len()..].starts_with("::"));
                if path {
                    named.insert(family);
                }
            }
        }
    }
    named
}

#[test]
fn concrete_backbone_families_are_named_only_where_declared() {
    let backbone = root().join("src/backbone");
    let mut violations = Vec::new();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    for file in files {
        let relative = file.strip_prefix(root()).expect("under the root");
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "tests.rs" || name == "testing.rs" {
            continue; // test code builds whatever it checks
        }
        let text = std::fs::read_to_string(&file).expect("read");
        let code = code_of(&text);
        let outside_tests = code.split("#[cfg(test)]").next().unwrap_or_default();
        let own_family = FAMILIES
            .iter()
            .find(|f| file.starts_with(backbone.join(f)))
            .copied();
        let allowed: &[&str] = FAMILY_NAMERS
            .iter()
            .find(|(path, _)| relative.starts_with(path) || relative.to_string_lossy() == *path)
            .map_or(&[], |(_, families)| *families);
        for family in families_named(outside_tests, file.starts_with(&backbone)) {
            if Some(family) != own_family && !allowed.contains(&family) {
                violations.push(format!(
                    "{} names the `{family}` family: go through the catalog, the \
                     Backbone trait or backbone's re-exports",
                    relative.display()
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_family_reader_sees_paths_groups_and_relative_forms() {
    let code = "use crate::backbone::{Input, vision::image::X};\n\
                fn f() { crate::backbone::bert::graph::Kernels::Fused; }";
    let found: Vec<_> = families_named(code, false).into_iter().collect();
    assert_eq!(found, ["bert", "vision"]);
    assert!(families_named("use super::{llama::LlamaBackbone, Input};", true).contains("llama"));
    assert!(families_named("use super::{llama::X};", false).is_empty());
    // A word that only starts like a family is none.
    assert!(families_named("use crate::backbone::bertish::X;", false).is_empty());
}

#[test]
fn the_import_reader_sees_groups_and_nested_paths() {
    let code =
        "use crate::{\n    backbone::{Input, image::X},\n    batching,\n    Error, Result,\n};\n\
                fn f() { crate::metrics::x(); let _ = crate::head::model::Dense; }";
    let found = imports(code);
    let expected: BTreeSet<String> = ["backbone", "batching", "Error", "Result", "metrics", "head"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
    assert!(imports("// use crate::server;\nlet x = 1;").contains("server"));
    assert!(imports(&code_of("// use crate::server;\nlet x = 1;")).is_empty());
}
