#!/usr/bin/env python3
"""Checks that what the code's comments cite exists: every repository file named in a comment,
and every section of README.md or ARCHITECTURE.md named in quotes after the document, e.g.
`(README, "Bounds")` or `ARCHITECTURE.md, "The proxy"`. Citations of files outside the
repository (`../something`, absolute paths to other trees) are refused: the docs stand alone.

Usage: scripts/lint-docs.py [ROOT]   (exit 1 and one line per broken citation)
       scripts/lint-docs.py --self-test (the lint finds what it must, on a throw-away repository)
"""

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = {"README": "README.md", "ARCHITECTURE": "ARCHITECTURE.md"}
# Sources whose comments are checked (vendored third-party code is not ours to lint).
SUFFIXES = (".rs", ".py", ".sh", ".toml", ".c", ".h")
SKIP_DIRS = ("vendor/", "target/", "fuzz/corpus/", "fuzz/artifacts/", "l7policy/tests/data/")



def comment_of(line, rust):
    """The comment part of a source line: `//` (Rust, C) or `#` (shell, Python, TOML, make) to the
    end of the line, outside string literals."""
    marker = "//" if rust else "#"
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c == '"' or (c == "'" and not rust):
            quote = c
        elif line.startswith(marker, i):
            return line[i + len(marker):].lstrip("/!").strip()
        i += 1
    return None

# README or ARCHITECTURE(.md), then up to a few words, then one or more quoted section names.
DOC_CITATION = re.compile(r"\b(README|ARCHITECTURE)(?:\.md)?(?:'s)?\b((?:(?!README|ARCHITECTURE)[^\"()]){0,40}?)((?:\s*(?:,|and|or)?\s*\"[^\"]+\")+)")
QUOTED = re.compile(r"\"([^\"]+)\"")
# Repository paths: a/b.ext with a known extension, or a top-level doc.
PATH = re.compile(r"(?<![\w./-])((?:\.\./|/work/)?[\w.-]+(?:/[\w.-]+)+\.(?:md|rs|py|sh|yaml|yml|json|toml|txt))\b")
OUTSIDE = re.compile(r"(?<![\w.])(\.\./shared|/work/shared|\.\./\.\./)")


def tracked_files():
    out = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f.endswith(SUFFIXES) or os.path.basename(f) == "Makefile"]


def headings(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return [m.group(1).strip() for m in re.finditer(r"^#+\s+(.*)$", f.read(), re.M)]


def section_exists(name, heads):
    name = name.strip().rstrip(".").lower()
    for h in heads:
        h = h.lower()
        # "The proxy" cites "The proxy (`l7proxy`)"; a heading may also be cited in full.
        if h == name or h.startswith(name + " (") or h.startswith(name + ":") or h.replace("`", "") == name.replace("`", ""):
            return True
    return False


def check():
    heads = {k: headings(v) for k, v in DOCS.items()}
    problems = []
    files = tracked_files()
    for rel in files:
        if rel.startswith(SKIP_DIRS) or rel == "scripts/lint-docs.py":
            continue
        path = os.path.join(ROOT, rel)
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for no, line in enumerate(lines, 1):
            text = comment_of(line, rel.endswith((".rs", ".c", ".h")))
            if not text:
                continue
            where = f"{rel}:{no}"
            if OUTSIDE.search(text):
                problems.append(f"{where}: cites a file outside the repository: {text.strip()}")
            for d in DOC_CITATION.finditer(text):
                for section in QUOTED.findall(d.group(3)):
                    if not section_exists(section, heads[d.group(1)]):
                        problems.append(f"{where}: {DOCS[d.group(1)]} has no section \"{section}\"")
            for p in PATH.findall(text):
                if p.startswith(("../", "/work/")):
                    continue  # reported above when it leaves the repository
                candidates = [os.path.join(ROOT, p), os.path.join(os.path.dirname(path), p)]
                # Crate-relative paths in a crate's own comments (`src/x.rs`, `tests/y.rs`).
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    candidates.append(os.path.join(ROOT, *parts[:i], p))
                # Or a path given from inside some crate (`tests/atomic.rs` of integration/).
                if not any(os.path.exists(c) for c in candidates) and not any(f.endswith("/" + p) for f in files):
                    problems.append(f"{where}: cites {p}, which does not exist")
    # The project's own documents stand alone too.
    for rel in files_md():
        for no, line in enumerate(open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines(), 1):
            if OUTSIDE.search(line):
                problems.append(f"{rel}:{no}: cites a file outside the repository")
    return problems


def files_md():
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "*.md"], capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if not f.startswith(SKIP_DIRS)]


def self_test():
    """A repository with one good and four broken citations: the lint must report exactly the four."""
    global ROOT
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "crate/src"))
        files = {
            "README.md": "# x\n## Bounds\n",
            "ARCHITECTURE.md": "# Architecture\n## The proxy (`l7proxy`)\n",
            "crate/src/lib.rs": "\n".join([
                '/// Fine: README, "Bounds"; ARCHITECTURE.md, "The proxy"; src/lib.rs.',
                '/// Broken: README, "No such section".',
                "/// Broken: see ../shared/DESIGN.md.",
                "/// Broken: crate/src/gone.rs.",
                'const S: &str = "not a comment: README, \\"Nope\\" ../shared/x.md";',
            ]),
            "NOTES.md": "see ../shared/STYLE.md\n",
        }
        for name, text in files.items():
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)
        subprocess.run(["git", "-C", d, "init", "-q"], check=True)
        subprocess.run(["git", "-C", d, "add", "."], check=True)
        ROOT = d
        found = check()
    want = ["crate/src/lib.rs:2:", "crate/src/lib.rs:3:", "crate/src/lib.rs:4:", "NOTES.md:1:"]
    if sorted(p.split(" ")[0] for p in found) != sorted(want):
        print("lint-docs self-test failed; found:\n  " + "\n  ".join(found))
        return 1
    print("lint-docs self-test: the 4 broken citations found, the good ones passed")
    return 0


def main():
    global ROOT
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if sys.argv[1:]:
        ROOT = os.path.abspath(sys.argv[1])
    problems = check()
    for p in problems:
        print(p)
    if problems:
        print(f"lint-docs: {len(problems)} broken citation(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
