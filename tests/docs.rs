//! The documentation against the code. The configuration reference (docs/configuration.md)
//! lists exactly the settings authd reads, every relative link in the Markdown reaches a
//! file and, when it names one, a heading of that file, and no table is cut in two by a
//! blank line (the rows after one render as plain text). No server, database or network:
//! these read files only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The Markdown a reader meets: the README, BENCHMARKS.md and everything in docs/.
fn markdown_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("a readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The path as the repository names it, for messages.
fn shown(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines outside fenced code blocks, numbered from 1 (a `# comment` in a shell block is
/// no heading, and a `](` in code no link).
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut in_fence = false;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence {
            lines.push((i + 1, line));
        }
    }
    lines
}

/// A heading's anchor as GitHub makes it: lower-case, every character that is not a
/// letter, digit, `-`, `_` or space dropped, spaces made `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a file's headings give; a repeated heading gets `-1`, `-2`… as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        let Some(title) = line[hashes..].strip_prefix(' ') else {
            continue;
        };
        if !(1..=6).contains(&hashes) {
            continue;
        }
        let base = slug(&link_texts_only(title));
        let n = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    anchors
}

/// `[text](target)` reduced to `text`, as a heading renders it.
fn link_texts_only(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let Some(close) = rest[at..].find(')') else {
            break;
        };
        out.push_str(&rest[..at].replace('[', ""));
        rest = &rest[at + close + 1..];
    }
    out.push_str(&rest.replace('[', ""));
    out
}

/// The file with fenced blocks and inline code spans blanked out (line breaks kept, so
/// lines keep their numbers): code that shows link syntax is no link. A span may run over
/// a line break, but not past the end of a paragraph.
fn without_code(text: &str) -> String {
    let mut fenced = vec![""; text.lines().count()];
    for (number, line) in prose_lines(text) {
        fenced[number - 1] = line;
    }
    let mut out = String::with_capacity(text.len());
    let mut in_span = false;
    for line in fenced {
        if line.trim().is_empty() {
            in_span = false;
        }
        for c in line.chars() {
            if c == '`' {
                in_span = !in_span;
                out.push(' ');
            } else {
                out.push(if in_span { ' ' } else { c });
            }
        }
        out.push('\n');
    }
    out
}

/// Every link target in the file's prose, with its line.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in without_code(text).lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find([')', ' ']).unwrap_or(rest.len());
            found.push((i + 1, rest[..end].to_owned()));
            rest = &rest[end..];
        }
    }
    found
}

/// What is wrong with the relative links of `file` (whose text is `text`): a target file
/// that does not exist, or an anchor that no heading of the target gives.
fn broken_links(file: &Path, text: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (line, target) in links(text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let at = format!("{}:{line}: ({target})", shown(file));
        let target_text = if path.is_empty() {
            text.to_owned()
        } else {
            let resolved = file.parent().expect("a file has a directory").join(path);
            if !resolved.exists() {
                broken.push(format!("{at}: no file {}", shown(&resolved)));
                continue;
            }
            if anchor.is_none() {
                continue;
            }
            if resolved.extension().is_none_or(|ext| ext != "md") {
                broken.push(format!("{at}: an anchor into a file that is not Markdown"));
                continue;
            }
            read(&resolved)
        };
        if let Some(anchor) = anchor
            && !anchors(&target_text).contains(anchor)
        {
            broken.push(format!("{at}: no heading gives #{anchor}"));
        }
    }
    broken
}

fn is_table_row(line: &str) -> bool {
    line.trim_start().starts_with('|')
}

fn is_separator_row(line: &str) -> bool {
    is_table_row(line) && line.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

/// Lines that look like table rows but begin no table: the previous line is no row, and
/// the next is not the header's separator. A blank line inside a table makes exactly this
/// of the row after it.
fn stray_rows(text: &str) -> Vec<usize> {
    let lines = prose_lines(text);
    let mut stray = Vec::new();
    for (i, &(number, line)) in lines.iter().enumerate() {
        let after_row = i > 0 && lines[i - 1].0 + 1 == number && is_table_row(lines[i - 1].1);
        let before_separator = lines
            .get(i + 1)
            .is_some_and(|&(next, l)| next == number + 1 && is_separator_row(l));
        if is_table_row(line) && !after_row && !before_separator {
            stray.push(number);
        }
    }
    stray
}

/// The variables documented in `text`: the backticked names in the first column of every
/// table whose first header is `Variable`.
fn documented_settings(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_settings_table = false;
    for (_, line) in prose_lines(text) {
        if !is_table_row(line) {
            in_settings_table = false;
            continue;
        }
        let first_cell = line.split('|').nth(1).unwrap_or("").trim();
        if first_cell == "Variable" {
            in_settings_table = true;
            continue;
        }
        if !in_settings_table || is_separator_row(line) {
            continue;
        }
        names.extend(
            first_cell
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| {
                    name.starts_with(|c: char| c.is_ascii_uppercase())
                        && name
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                })
                .map(str::to_owned),
        );
    }
    names
}

#[test]
fn the_configuration_reference_lists_exactly_the_settings_authd_reads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let documented = documented_settings(&read(&path));

    let mut twice: Vec<&String> = documented
        .iter()
        .filter(|name| documented.iter().filter(|n| n == name).count() > 1)
        .collect();
    twice.dedup();
    assert!(twice.is_empty(), "documented more than once: {twice:?}");

    let documented: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
    let settings: BTreeSet<&str> = authd::config::SETTINGS.iter().copied().collect();
    let undocumented: Vec<_> = settings.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&settings).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md and authd::config::SETTINGS differ:\n  \
         read by authd but not documented: {undocumented:?}\n  \
         documented but not read by authd: {unknown:?}"
    );
}

#[test]
fn every_relative_link_in_the_docs_reaches_its_file_and_heading() {
    let broken: Vec<String> = markdown_files()
        .iter()
        .flat_map(|file| broken_links(file, &read(file)))
        .collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn no_table_in_the_docs_is_cut_by_a_blank_line() {
    let stray: Vec<String> = markdown_files()
        .iter()
        .flat_map(|file| {
            stray_rows(&read(file))
                .into_iter()
                .map(move |line| format!("{}:{line}", shown(file)))
        })
        .collect();
    assert!(
        stray.is_empty(),
        "table rows outside any table (a blank line above them?):\n{}",
        stray.join("\n")
    );
}

/// The checks above pass when nothing is wrong; this shows they also see what is.
#[test]
fn the_checks_catch_what_they_are_for() {
    assert_eq!(
        slug("Service meshes: Envoy ext_authz, asymmetric keys, JWKS"),
        "service-meshes-envoy-ext_authz-asymmetric-keys-jwks"
    );
    assert_eq!(slug("2. Tokens and sessions"), "2-tokens-and-sessions");
    assert_eq!(
        slug("How it checks, and what `AuthConfig` changes"),
        "how-it-checks-and-what-authconfig-changes"
    );

    let page = "# Title\n\n## Limits\n\n## Limits\n\n```sh\n# not a heading\n```\n\n\
                [ok](#limits) [again](#limits-1) [gone](#not-a-heading) [none](no-such-file.md)\n\
                `[code](#is-not-a-link)`\n";
    assert_eq!(
        anchors(page),
        BTreeSet::from(["title".into(), "limits".into(), "limits-1".into()])
    );
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/page.md");
    let broken = broken_links(&file, page);
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].contains("#not-a-heading"), "{broken:?}");
    assert!(broken[1].contains("no-such-file.md"), "{broken:?}");

    let table = "| Variable | Default | Meaning |\n|---|---|---|\n| `A_B` / `C` | 1 | x |\n\n\
                 | `D` | 2 | y |\n\nText.\n\n| Metric | Type |\n|---|---|\n| `E` | gauge |\n";
    assert_eq!(stray_rows(table), vec![5]);
    assert_eq!(documented_settings(table), ["A_B", "C"]);
}
