//! The layers `src/lib.rs` draws are the layers the code has: every module imports only
//! from modules in rows below its own, and the files of one folder import each other one
//! way. Reads the table from the crate's documentation, so the picture and the code cannot
//! drift apart. Needs no services.

use std::{collections::BTreeMap, fs, path::Path};

use regex::Regex;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Each top-level module's row, from the table in `lib.rs`.
fn layers() -> BTreeMap<String, u32> {
    let rows = rows();
    let layers: BTreeMap<String, u32> = rows.iter().cloned().collect();
    assert_eq!(
        layers.len(),
        rows.len(),
        "a module is in two rows: {rows:?}"
    );
    layers
}

/// The table's entries as written.
fn rows() -> Vec<(String, u32)> {
    let lib = fs::read_to_string(format!("{SRC}/lib.rs")).expect("src/lib.rs is readable");
    let row = Regex::new(r"^//! (\d)  (\S+(?: \S+)*)\s{2,}").expect("a valid pattern");
    lib.lines()
        .filter_map(|line| row.captures(line))
        .flat_map(|c| {
            let layer: u32 = c[1].parse().expect("a row number");
            c[2].split(' ')
                .map(|m| (m.to_owned(), layer))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The top-level modules a file names through `crate::`, grouped `use` trees included.
/// Tests inside the file (after `#[cfg(test)]`) may reach anything.
fn imports(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).expect("a source file is readable");
    let code = before_tests(&text);
    let single = Regex::new(r"\bcrate::(\w+)").expect("a valid pattern");
    let group = Regex::new(r"\bcrate::\{").expect("a valid pattern");
    let mut found: Vec<String> = single
        .captures_iter(code)
        .map(|c| c[1].to_owned())
        .collect();
    for start in group.find_iter(code) {
        let mut depth = 1;
        let mut item = String::new();
        for ch in code[start.end()..].chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                break;
            }
            if depth == 1 && ch == ',' {
                found.push(first_segment(&item));
                item.clear();
            } else if depth == 1 || !item.contains("::") {
                item.push(ch);
            }
        }
        found.push(first_segment(&item));
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

/// A file's code without its unit tests (`#[cfg(test)] mod tests { ... }`, which may reach
/// anything); a test-only `mod` declared higher up cuts nothing.
fn before_tests(text: &str) -> &str {
    let tests = Regex::new(r"#\[cfg\(test\)\]\s*mod tests\b").expect("a valid pattern");
    tests.find(text).map_or(text, |m| &text[..m.start()])
}

fn first_segment(item: &str) -> String {
    item.trim()
        .split("::")
        .next()
        .unwrap_or_default()
        .trim_matches(|c: char| !c.is_alphanumeric() && c != '_')
        .to_owned()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("src is a folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/store/log.rs` → `store`).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(SRC).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

#[test]
fn every_module_has_a_row() {
    let layers = layers();
    let mut files = Vec::new();
    sources(Path::new(SRC), &mut files);
    let missing: Vec<String> = files
        .iter()
        .filter_map(|f| module_of(f))
        .filter(|m| !layers.contains_key(m))
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from the table in src/lib.rs: {missing:?}"
    );
}

#[test]
fn every_module_imports_only_from_rows_below_its_own() {
    let layers = layers();
    assert!(layers.len() > 10, "the table in src/lib.rs was not found");
    let mut files = Vec::new();
    sources(Path::new(SRC), &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(&own) = layers.get(&module) else {
            continue;
        };
        for target in imports(file) {
            if target == module {
                continue;
            }
            if let Some(&theirs) = layers.get(&target)
                && theirs >= own
            {
                upward.push(format!(
                    "{} ({module}, row {own}) imports {target} (row {theirs})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

/// The sibling files of one folder that a file names through `super::` (grouped trees
/// included): `store/log.rs` naming `super::vocabulary` depends on `store/vocabulary.rs`.
fn sibling_imports(path: &Path, siblings: &[String]) -> Vec<String> {
    let text = fs::read_to_string(path).expect("a source file is readable");
    let code = before_tests(&text);
    let named = Regex::new(r"\bsuper::(\w+)").expect("a valid pattern");
    let grouped = Regex::new(r"\bsuper::\{([^;]*)\}").expect("a valid pattern");
    let word = Regex::new(r"(?:^|[{,\s])(\w+)::").expect("a valid pattern");
    let mut found: Vec<String> = named.captures_iter(code).map(|c| c[1].to_owned()).collect();
    for group in grouped.captures_iter(code) {
        found.extend(word.captures_iter(&group[1]).map(|c| c[1].to_owned()));
    }
    found.retain(|name| siblings.contains(name));
    found.sort();
    found.dedup();
    found
}

/// A cycle in `graph`, as the names along it, if there is one.
fn a_cycle(graph: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            return Some(path[at..].to_vec());
        }
        if done.iter().any(|n| n == node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.push(node.to_owned());
        None
    }
    let mut done = Vec::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn sibling_files_import_each_other_one_way() {
    let mut files = Vec::new();
    sources(Path::new(SRC), &mut files);
    let mut folders: BTreeMap<std::path::PathBuf, Vec<std::path::PathBuf>> = BTreeMap::new();
    for file in files {
        let name = file
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !matches!(name, "mod" | "lib" | "main") {
            let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
            folders.entry(folder).or_default().push(file);
        }
    }
    let stem = |f: &std::path::PathBuf| f.file_stem().and_then(|n| n.to_str()).map(str::to_owned);
    for (folder, files) in folders {
        let siblings: Vec<String> = files.iter().filter_map(stem).collect();
        let graph: BTreeMap<String, Vec<String>> = files
            .iter()
            .filter_map(|f| Some((stem(f)?, sibling_imports(f, &siblings))))
            .collect();
        assert_eq!(
            a_cycle(&graph),
            None,
            "files of {} import each other in a circle",
            folder.display()
        );
    }
}

#[test]
fn the_cycle_finder_finds_one() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph
                .entry((*from).to_owned())
                .or_default()
                .push((*to).to_owned());
        }
        graph
    };
    assert_eq!(a_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        a_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
}

#[test]
fn the_import_reader_sees_grouped_trees() {
    let dir = std::env::temp_dir().join(format!("smsgw-layers-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("a temporary folder");
    let file = dir.join("sample.rs");
    fs::write(
        &file,
        "#[cfg(test)]\nmod scripted;\nuse crate::{\n    job::{JobType, Lane},\n    store::Store,\n};\nuse crate::phone::PhoneNumber;\n#[cfg(test)]\nmod tests {\nuse crate::daemon;\n}\n",
    )
    .expect("a sample file");
    let mut found = imports(&file);
    found.sort();
    assert_eq!(found, ["job", "phone", "store"]);
    let _ = fs::remove_dir_all(dir);
}
