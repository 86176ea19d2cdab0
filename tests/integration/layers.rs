//! The layers ARCHITECTURE.md promises, read from the sources: no file imports one that
//! imports it back (directly or around a longer loop), `domain` imports nothing of the
//! crate outside `domain` and no I/O or wire crate, and nothing below `grpc` names tonic.
//! And no function is longer than `FUNCTION_LINES_MAX` unless a comment above it says
//! why. Test modules (`#[cfg(test)] mod tests` at a file's end) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A function longer than this says why in a comment just above it (a line with "long").
const FUNCTION_LINES_MAX: usize = 70;

/// Every source file under `src/`, by module path (`service::engine`; `lib.rs` is "").
fn sources() -> BTreeMap<String, String> {
    files()
        .into_iter()
        .map(|(module, (_, code))| (module, code))
        .collect()
}

/// Every source file under `src/`, by module path: its text without its test module,
/// and that text's code without line comments.
fn files() -> BTreeMap<String, (String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = without_tests(&std::fs::read_to_string(&path).unwrap());
                let code = code_of(&text);
                files.insert(module_of(&root, &path), (text, code));
            }
        }
    }
    files
}

fn module_of(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap().with_extension("");
    let module = relative.to_str().unwrap().replace('/', "::");
    let module = module.strip_suffix("::mod").unwrap_or(&module);
    match module {
        "lib" | "main" => String::new(),
        module => module.to_string(),
    }
}

/// A file's text up to its first test module.
fn without_tests(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let test_module = (0..lines.len()).find(|&i| {
        let next = lines.get(i + 1).map_or("", |l| l.trim_start());
        lines[i].trim() == "#[cfg(test)]" && next.contains("mod ") && next.ends_with('{')
    });
    lines[..test_module.unwrap_or(lines.len())].join("\n")
}

/// A text's code without line comments.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest module path `path` starts with, if it names one of `modules`.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|candidate| modules.contains(candidate))
}

/// The paths a file names from `crate::` and `super::` (groups `{a, b::c}` opened).
fn named_paths(module: &str, code: &str) -> Vec<String> {
    let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
    let mut paths = Vec::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_string())] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = format!("{base}::{}", rest[..end].trim_end_matches(':'));
            paths.push(path.clone());
            if rest[end..].starts_with('{') {
                let group = &rest[end + 1..rest[end..].find('}').map_or(rest.len(), |e| end + e)];
                for item in group.split(',') {
                    let item = item.trim().split([' ', '{']).next().unwrap_or("");
                    paths.push(format!("{path}::{}", item.trim_end_matches(':')));
                }
            }
        }
    }
    paths
}

/// Which modules each module imports (other than itself and the crate root).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, code)| {
            let targets = named_paths(module, code)
                .iter()
                .filter_map(|path| resolve(path, &modules))
                .filter(|target| target != module && !target.is_empty())
                .collect();
            (module.clone(), targets)
        })
        .collect()
}

/// A loop of imports starting and ending at `start`, if there is one.
fn loop_through(start: &str, graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(route) = stack.pop() {
        let last = route.last().unwrap();
        for next in &graph[last] {
            if next == start {
                return Some([route.clone(), vec![next.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push([route.clone(), vec![next.clone()]].concat());
            }
        }
    }
    None
}

#[test]
fn no_file_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 80, "read the sources: {} files", graph.len());
    assert!(
        graph["service::campaigns"].contains("service::engine"),
        "the reader sees imports"
    );
    let loops: Vec<String> = graph
        .keys()
        .filter_map(|module| loop_through(module, &graph))
        .map(|route| route.join(" -> "))
        .collect();
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

/// The functions of `text` longer than `FUNCTION_LINES_MAX` lines: (first line, lines,
/// whether a comment just above says why).
fn long_functions(text: &str) -> Vec<(usize, usize, bool)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let words: Vec<&str> = code.split_whitespace().take(4).collect();
        let Some(fn_at) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        let prefix_ok = words[..fn_at]
            .iter()
            .all(|w| matches!(*w, "pub" | "async" | "const" | "unsafe") || w.starts_with("pub("));
        if !prefix_ok || code.ends_with(';') {
            continue;
        }
        let close = format!("{}}}", &line[..line.len() - code.len()]);
        let Some(end) = (start + 1..lines.len()).find(|&i| lines[i] == close) else {
            continue;
        };
        let count = end - start + 1;
        if count > FUNCTION_LINES_MAX {
            let above = &lines[start.saturating_sub(4)..start];
            let says_why = above
                .iter()
                .any(|l| l.trim_start().starts_with("//") && l.to_lowercase().contains("long"));
            long.push((start + 1, count, says_why));
        }
    }
    long
}

#[test]
fn long_functions_say_why() {
    let mut unexplained = Vec::new();
    let mut explained = 0;
    for (module, (text, _)) in files() {
        for (line, count, says_why) in long_functions(&text) {
            match says_why {
                true => explained += 1,
                false => unexplained.push(format!("{module}:{line} ({count} lines)")),
            }
        }
    }
    assert!(explained >= 1, "the reader finds long functions");
    assert!(
        unexplained.is_empty(),
        "functions over {FUNCTION_LINES_MAX} lines with no comment saying why:\n{}",
        unexplained.join("\n")
    );
}

#[test]
fn the_domain_is_pure_and_tonic_stays_above_the_service() {
    let graph = imports();
    for (module, code) in sources() {
        if module.starts_with("domain") {
            let outside = graph[&module]
                .iter()
                .filter(|target| !target.starts_with("domain"))
                .cloned()
                .collect::<Vec<_>>();
            assert!(outside.is_empty(), "{module} imports {outside:?}");
            for io in ["tokio::", "tonic::", "sled::", "serde::", "std::fs"] {
                assert!(!code.contains(io), "{module} names {io}");
            }
        }
        let below = ["store", "service", "domain", "config", "limits"];
        if below.iter().any(|layer| module.starts_with(layer)) {
            assert!(!code.contains("tonic::"), "{module} names tonic");
        }
    }
}
