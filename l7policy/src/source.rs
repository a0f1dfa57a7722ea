//! Reading policy files: multi-document YAML (or JSON, which YAML contains) into JSON values,
//! remembering the line of every field so that errors can name it.
//!
//! yaml-rust2's event parser gives positions; serde_yaml would give none for semantic errors.
//! Scalars are typed as Kubernetes' YAML decoder types them: quoted scalars are strings, plain
//! ones become null/bool/number when they read as one.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Lines of the fields of one document, keyed by field path (`spec.ingress[0].toPorts`).
#[derive(Clone, Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

impl LineIndex {
    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// One document of a file.
#[derive(Clone, Debug)]
pub struct SourceDocument {
    pub file: String,
    /// Line where the document starts (1-based).
    pub line: usize,
    pub value: Value,
    pub index: LineIndex,
}

/// A file that is not well-formed YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: invalid YAML: {}", self.file, self.line, self.column, self.message)
    }
}

enum Frame {
    Map { map: Map<String, Value>, pending_key: Option<String>, path: String },
    Seq { items: Vec<Value>, path: String },
}

/// Kubernetes reads policies as JSON, whose keys are strings: a mapping or sequence as a key
/// is refused. (Turned into text instead, a key nested in keys was escaped once per level: a
/// 70-byte file of nested `{` took 40 s to read, found by the policy_text fuzz target.)
const COMPLEX_KEY: &str = "a mapping key must be a string, number or boolean, not a mapping or sequence";

#[derive(Default)]
struct Builder {
    docs: Vec<(usize, Value, LineIndex)>,
    stack: Vec<Frame>,
    index: LineIndex,
    doc_line: usize,
    anchors: HashMap<usize, Value>,
    anchor_of_frame: Vec<usize>,
    error: Option<(Marker, String)>,
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// The path the next value will have.
    fn next_path(&self) -> String {
        match self.stack.last() {
            Some(Frame::Map { pending_key: Some(k), path, .. }) => child_path(path, k),
            Some(Frame::Seq { items, path }) => format!("{path}[{}]", items.len()),
            _ => String::new(),
        }
    }

    fn push_value(&mut self, value: Value) {
        match self.stack.last_mut() {
            Some(Frame::Map { map, pending_key, path }) => match pending_key.take() {
                Some(k) => {
                    map.insert(k, value);
                }
                None => {
                    // This value is a key.
                    let key = match value {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    let _ = path;
                    *pending_key = Some(key);
                }
            },
            Some(Frame::Seq { items, .. }) => items.push(value),
            None => {
                let index = std::mem::take(&mut self.index);
                self.docs.push((self.doc_line, value, index));
            }
        }
    }

    fn is_key_position(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { pending_key: None, .. }))
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => self.doc_line = mark.line(),
            Event::Scalar(text, style, anchor, _tag) => {
                let value =
                    if style == TScalarStyle::Plain { plain_scalar(&text) } else { Value::String(text.clone()) };
                if self.is_key_position() {
                    let path = match self.stack.last() {
                        Some(Frame::Map { path, .. }) => child_path(path, &text),
                        _ => text.clone(),
                    };
                    self.index.lines.entry(path).or_insert(mark.line());
                } else {
                    let path = self.next_path();
                    self.index.lines.entry(path).or_insert(mark.line());
                }
                if anchor > 0 {
                    self.anchors.insert(anchor, value.clone());
                }
                self.push_value(value);
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(v) if self.is_key_position() && (v.is_object() || v.is_array()) => {
                    self.error = Some((mark, COMPLEX_KEY.into()));
                }
                Some(v) => {
                    let v = v.clone();
                    self.push_value(v);
                }
                None => self.error = Some((mark, format!("unknown alias {id}"))),
            },
            Event::MappingStart(anchor, _) => {
                let path = self.next_path();
                self.index.lines.entry(path.clone()).or_insert(mark.line());
                self.anchor_of_frame.push(anchor);
                self.stack.push(Frame::Map { map: Map::new(), pending_key: None, path });
            }
            Event::SequenceStart(anchor, _) => {
                let path = self.next_path();
                self.index.lines.entry(path.clone()).or_insert(mark.line());
                self.anchor_of_frame.push(anchor);
                self.stack.push(Frame::Seq { items: Vec::new(), path });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let value = match self.stack.pop() {
                    Some(Frame::Map { map, .. }) => Value::Object(map),
                    Some(Frame::Seq { items, .. }) => Value::Array(items),
                    None => return,
                };
                if let Some(anchor) = self.anchor_of_frame.pop() {
                    if anchor > 0 {
                        self.anchors.insert(anchor, value.clone());
                    }
                }
                if self.is_key_position() {
                    self.error = Some((mark, COMPLEX_KEY.into()));
                    return;
                }
                self.push_value(value);
            }
            _ => {}
        }
    }
}

/// Plain scalars as YAML 1.2's core schema (which Kubernetes' decoder follows) types them.
fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Number(i.into());
    }
    if text.chars().any(|c| c.is_ascii_digit()) && !text.contains(':') {
        if let Ok(f) = text.parse::<f64>() {
            if let Some(n) = Number::from_f64(f) {
                return Value::Number(n);
            }
        }
    }
    Value::String(text.to_string())
}

/// Parses every document of `text`. Empty documents are skipped.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<SourceDocument>, SyntaxError> {
    let mut builder = Builder { doc_line: 1, ..Builder::default() };
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        file: file.to_string(),
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    if let Some((mark, message)) = builder.error {
        return Err(SyntaxError { file: file.to_string(), line: mark.line(), column: mark.col() + 1, message });
    }
    Ok(builder
        .docs
        .into_iter()
        .filter(|(_, v, _)| !v.is_null())
        .map(|(line, value, index)| SourceDocument { file: file.to_string(), line, value, index })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_lines_of_a_multi_document_file() {
        let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: a\nspec:\n  ingress:\n  - toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n---\nkind: X\nn: 8080\nq: '8080'\n";
        let docs = parse_documents("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.value["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"], "80");
        assert_eq!(d.index.line_of("spec.ingress[0].toPorts[0].ports[0].port"), Some(9));
        assert_eq!(d.index.line_of("spec.ingress[0].toPorts[0].ports[0].protocol"), Some(10));
        assert_eq!(d.index.line_of("spec.ingress[0].toPorts[0].ports[0].missing"), Some(9));
        assert_eq!(d.index.line_of("metadata.name"), Some(4));
        assert_eq!(docs[1].value["n"], 8080);
        assert_eq!(docs[1].value["q"], "8080");
        assert_eq!(docs[1].index.line_of("q"), Some(14));
    }

    #[test]
    fn json_is_read_too() {
        let docs =
            parse_documents("f.json", "{\"kind\": \"CiliumNetworkPolicy\",\n \"spec\": {\"ingress\": [{}]}}").unwrap();
        assert_eq!(docs[0].value["spec"]["ingress"][0], serde_json::json!({}));
        assert_eq!(docs[0].index.line_of("spec.ingress[0]"), Some(2));
    }

    #[test]
    fn mappings_and_sequences_are_not_keys() {
        for text in ["{{a: 1}: 2}", "? [a, b]\n: c\n", "x: &k {a: 1}\ny: {*k : 2}\n"] {
            let err = parse_documents("k.yaml", text).unwrap_err();
            assert!(err.message.contains("mapping key must be"), "{text:?}: {err}");
        }
        // Nested keys were escaped once per level (40 levels: 2^40 bytes); now refused at the
        // first level that closes.
        let nested = format!("{}{}", "{".repeat(40), "}".repeat(40));
        assert!(parse_documents("n.yaml", &nested).unwrap_err().message.contains("mapping key must be"));
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = parse_documents("bad.yaml", "a: [1, 2\nb: c\n").unwrap_err();
        assert_eq!(err.file, "bad.yaml");
        assert!(err.line >= 1, "{err}");
    }
}
