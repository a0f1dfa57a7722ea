//! Workload labels and label selectors with Cilium's label sources (`k8s:`, `any:`, `reserved:`).

use std::collections::BTreeMap;

use crate::model::{Requirement, Selector};

/// The namespace label every workload carries (Cilium's, for Kubernetes pods).
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
pub const DEFAULT_NAMESPACE: &str = "default";
/// Label sources Cilium knows; a selector key `source:key` with another prefix is a plain key.
const SOURCES: &[&str] = &["k8s", "any", "reserved", "container", "unspec", "cilium-generated"];

/// A selector or label key split into its source (None: any source) and key.
pub fn split_source(key: &str) -> (Option<&str>, &str) {
    if let Some((source, rest)) = key.split_once(':') {
        if SOURCES.contains(&source) {
            return (if source == "any" { None } else { Some(source) }, rest);
        }
    }
    (None, key)
}

/// A workload's labels: key -> (source, value). Labels given on the command line are `k8s`
/// labels, as a pod's would be, so policies written for Kubernetes select them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Labels {
    pub entries: BTreeMap<String, (String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("label key `{0}` is empty")]
    EmptyKey(String),
    #[error("label source `{0}` cannot be set on a workload (only k8s labels can)")]
    Source(String),
}

impl Labels {
    /// Parses `k=v,k2=v2` (keys may carry a `k8s:` prefix). The namespace comes from the
    /// `io.kubernetes.pod.namespace` label, default `default`.
    pub fn parse(spec: &str) -> Result<Self, LabelError> {
        let mut labels = Labels::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| LabelError::NotKeyValue(item.to_string()))?;
            let (source, key) = split_source(key.trim());
            match source {
                None | Some("k8s") => {}
                Some(other) => return Err(LabelError::Source(other.to_string())),
            }
            if key.is_empty() {
                return Err(LabelError::EmptyKey(item.to_string()));
            }
            labels.entries.insert(key.to_string(), ("k8s".to_string(), value.trim().to_string()));
        }
        labels
            .entries
            .entry(NAMESPACE_KEY.to_string())
            .or_insert_with(|| ("k8s".to_string(), DEFAULT_NAMESPACE.to_string()));
        Ok(labels)
    }

    pub fn namespace(&self) -> &str {
        self.entries.get(NAMESPACE_KEY).map(|(_, v)| v.as_str()).unwrap_or(DEFAULT_NAMESPACE)
    }

    fn get(&self, selector_key: &str) -> Option<&str> {
        let (source, key) = split_source(selector_key);
        let (label_source, value) = self.entries.get(key)?;
        match source {
            Some(s) if s != label_source => None,
            _ => Some(value.as_str()),
        }
    }

    /// `k=v` pairs as a display string (`app=web,env=prod`), namespace label left out.
    pub fn display(&self) -> String {
        self.entries
            .iter()
            .filter(|(k, _)| k.as_str() != NAMESPACE_KEY)
            .map(|(k, (_, v))| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A selector ready to match, with the namespace restriction a namespaced policy adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pub labels: BTreeMap<String, String>,
    pub expressions: Vec<Requirement>,
    pub namespace: Option<String>,
}

impl Matcher {
    /// `namespace`: the namespace of a namespaced policy; it restricts the selector unless the
    /// selector names the namespace label itself (as Cilium does).
    pub fn new(selector: &Selector, namespace: Option<&str>) -> Self {
        let labels = selector.match_labels.clone().unwrap_or_default();
        let expressions = selector.match_expressions.clone().unwrap_or_default();
        let names_namespace =
            labels.keys().chain(expressions.iter().map(|e| &e.key)).any(|k| split_source(k).1 == NAMESPACE_KEY);
        Matcher { labels, expressions, namespace: if names_namespace { None } else { namespace.map(str::to_string) } }
    }

    /// Reserved identities a selector names (`reserved:host`, `reserved:world`), if it is one.
    pub fn reserved(&self) -> Option<Vec<&str>> {
        let reserved: Vec<&str> = self
            .labels
            .keys()
            .filter_map(|k| match split_source(k) {
                (Some("reserved"), name) => Some(name),
                _ => None,
            })
            .collect();
        (!reserved.is_empty()).then_some(reserved)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        if let Some(ns) = &self.namespace {
            if labels.namespace() != ns {
                return false;
            }
        }
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match crate::validate::canonical_operator(&e.operator).unwrap_or("") {
                    "In" => value.is_some_and(|v| e.values.iter().any(|x| x == v)),
                    "NotIn" => value.is_none_or(|v| !e.values.iter().any(|x| x == v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(labels: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            match_expressions: None,
        }
    }

    #[test]
    fn sources_and_namespaces() {
        let l = Labels::parse("org=empire,class=tiefighter").unwrap();
        assert_eq!(l.namespace(), "default");
        assert!(Matcher::new(&sel(&[("org", "empire")]), Some("default")).matches(&l));
        assert!(Matcher::new(&sel(&[("k8s:org", "empire")]), Some("default")).matches(&l));
        assert!(Matcher::new(&sel(&[("any:org", "empire")]), None).matches(&l));
        assert!(!Matcher::new(&sel(&[("container:org", "empire")]), None).matches(&l));
        assert!(!Matcher::new(&sel(&[("org", "empire")]), Some("prod")).matches(&l), "other namespace");
        let named = sel(&[("org", "empire"), ("k8s:io.kubernetes.pod.namespace", "default")]);
        assert!(Matcher::new(&named, Some("prod")).matches(&l), "a selector naming the namespace crosses namespaces");
    }

    #[test]
    fn expressions() {
        let l = Labels::parse("env=prod").unwrap();
        let m = |op: &str, values: &[&str]| Matcher {
            labels: BTreeMap::new(),
            expressions: vec![Requirement {
                key: "env".into(),
                operator: op.into(),
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
            namespace: None,
        };
        assert!(m("In", &["prod", "dev"]).matches(&l));
        assert!(!m("NotIn", &["prod"]).matches(&l));
        assert!(m("Exists", &[]).matches(&l));
        assert!(!m("DoesNotExist", &[]).matches(&l));
    }

    #[test]
    fn bad_labels() {
        assert_eq!(Labels::parse("app"), Err(LabelError::NotKeyValue("app".into())));
        assert_eq!(Labels::parse("reserved:host=x"), Err(LabelError::Source("reserved".into())));
    }
}
