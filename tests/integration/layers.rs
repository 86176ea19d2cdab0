//! The layers ARCHITECTURE.md promises, read from the sources: no file imports one that
//! imports it back (directly or around a longer loop), `domain` imports nothing of the
//! crate outside `domain` and no I/O or wire crate, and nothing below `grpc` names tonic.
//! And no function is longer than `FUNCTION_LINES_MAX` unless a comment above it says
//! why. Test modules (`#[cfg(test)] mod tests` at a file's end) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A function longer than this says why in a comment just above it ("long because"
/// or "long, but").
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
        "lib" => String::new(),
        module => module.to_string(), // `main`: the binary, which names the crate `prenota`
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

/// The paths a file names from `crate::` and `super::` (`use` trees opened).
fn named_paths(module: &str, code: &str) -> Vec<String> {
    let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
    // `mod v3 { .. super::v2 .. }`: inside a file's inline module, `super` is the file.
    let inline: Vec<String> = code
        .match_indices("mod ")
        .filter_map(|(at, _)| code[at + 4..].split_once(" {").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_alphanumeric() || c == '_'))
        .map(|name| format!("super::{name}::"))
        .collect();
    let mut paths = Vec::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_string())] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            // `pub(in crate::service)` is a visibility, not an import.
            let visibility = rest[..at].ends_with("(in ");
            let sibling = inline
                .iter()
                .any(|name| rest[at..].starts_with(name.as_str()));
            rest = &rest[at + prefix.len()..];
            if visibility || sibling {
                continue;
            }
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = format!("{base}::{}", rest[..end].trim_end_matches(':'));
            if rest[end..].starts_with('{') {
                let tree = rest[..end + closing_brace(&rest[end..])]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                let paths_in = expand(&tree).into_iter();
                paths.extend(paths_in.map(|p| {
                    let path = p.split(" as ").next().unwrap_or("");
                    format!("{base}::{path}")
                }));
            } else {
                paths.push(path);
            }
        }
    }
    paths
}

/// The `use` statements of `code` (text from `use` to `;`, one space between words), with
/// whether each is a `pub use` (a re-export).
fn uses(code: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("use ") {
        let before = code[..at].trim_end_matches(' ');
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        let lead = before[line_start..].trim();
        if !matches!(lead, "" | "pub" | "pub(crate)" | "pub(super)") {
            continue;
        }
        let statement = &code[at + 4..];
        let end = statement.find(';').unwrap_or(statement.len());
        let text = statement[..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        found.push((text, lead.starts_with("pub")));
    }
    found
}

/// What a `use` of `module` names: (exported name, full path), paths made absolute.
fn used_paths(module: &str, statement: &str) -> Vec<(String, String)> {
    let parent = module.rsplit_once("::").map_or("", |(parent, _)| parent);
    let absolute = |path: &str| match path.split_once("::") {
        Some(("crate", rest)) => rest.to_string(),
        Some(("super", rest)) => format!("{parent}::{rest}"),
        Some(("self", rest)) => format!("{module}::{rest}"),
        _ => format!("{module}::{path}"),
    };
    expand(statement)
        .into_iter()
        .filter(|path| !path.ends_with("::self") && !path.ends_with("::*"))
        .map(|path| {
            let (path, name) = match path.split_once(" as ") {
                Some((path, alias)) => (path.to_string(), alias.to_string()),
                None => (
                    path.clone(),
                    path.rsplit("::").next().unwrap_or("").to_string(),
                ),
            };
            (name, absolute(&path))
        })
        .collect()
}

/// The length of `text` up to and including the brace closing its first one.
fn closing_brace(text: &str) -> usize {
    let mut depth = 0;
    for (at, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return at + 1,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

/// The paths of a `use` tree: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let Some((head, group)) = tree.split_once("::{") else {
        return vec![tree.to_string()];
    };
    let group = group.strip_suffix('}').unwrap_or(group);
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .flat_map(|item| {
            expand(item)
                .into_iter()
                .map(|path| format!("{head}::{path}"))
        })
        .collect()
}

/// Which modules each module imports (other than itself and the crate root). A name
/// imported through a re-export (`crate::service::Engine`) counts as an import of the
/// file that defines it; a `use` of a child module counts too.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut reexported: BTreeMap<(String, String), String> = BTreeMap::new();
    for (module, code) in &files {
        for (statement, _) in uses(code).into_iter().filter(|(_, public)| *public) {
            for (name, path) in used_paths(module, &statement) {
                if let Some(target) = resolve(&path, &modules) {
                    reexported.insert((module.clone(), name), target);
                }
            }
        }
    }
    // A path's module, or the defining file of the name it takes from a re-export.
    let target_of = |path: &str| {
        let path = path.trim_start_matches(':');
        let mut target = resolve(path, &modules)?;
        for _ in 0..3 {
            let rest = path.strip_prefix(target.as_str()).unwrap_or(path);
            let name = rest
                .trim_start_matches(':')
                .split("::")
                .next()
                .unwrap_or("");
            match reexported.get(&(target.clone(), name.to_string())) {
                Some(defined) if *defined != target => target = defined.clone(),
                _ => break,
            }
        }
        Some(target)
    };
    files
        .iter()
        .map(|(module, code)| {
            let relative = uses(code).into_iter().flat_map(|(statement, _)| {
                used_paths(module, &statement)
                    .into_iter()
                    .map(|(_, path)| path)
            });
            let children = child_paths(module, code, &modules);
            let named = (named_paths(module, code).into_iter())
                .chain(relative)
                .chain(children);
            let targets = named
                .filter_map(|path| target_of(&path))
                .filter(|target| target != module && !target.is_empty())
                .collect();
            (module.clone(), targets)
        })
        .collect()
}

/// The paths into child modules `module`'s code names bare (`watermark::Keeper` in
/// `store/mod.rs`), made absolute: the whole path, so `state::campaigns::X` in
/// `service/mod.rs` is resolved to the deepest module it names.
fn child_paths(module: &str, code: &str, modules: &BTreeSet<String>) -> Vec<String> {
    let prefix = match module {
        "" => String::new(),
        module => format!("{module}::"),
    };
    let children = (modules.iter())
        .filter_map(|m| m.strip_prefix(prefix.as_str()))
        .filter(|child| !child.is_empty() && !child.contains("::"));
    let is_path = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut paths = Vec::new();
    for child in children {
        for (at, _) in code.match_indices(&format!("{child}::")) {
            if code[..at].chars().next_back().is_some_and(is_path) {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !is_path(c))
                .map_or(code.len(), |n| at + n);
            paths.push(format!("{prefix}{}", code[at..end].trim_end_matches(':')));
        }
    }
    paths
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
/// whether a comment just above says why: "long because" or "long, but").
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
            let says_why = above.iter().any(|l| {
                let l = l.to_lowercase();
                l.trim_start().starts_with("//")
                    && (l.contains("long because") || l.contains("long, but"))
            });
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
