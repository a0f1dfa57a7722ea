//! The one table of Kafka API keys that validation, compilation and enforcement share, derived
//! from `kafka_protocol::messages::ApiKey`, so a name the validator accepts always compiles to
//! exactly one wire key (never to "every key").

use std::sync::OnceLock;

use kafka_protocol::messages::ApiKey;

/// One Kafka API as policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaApi {
    /// The wire key.
    pub key: i16,
    /// The codec's variant; `None` for the inter-broker APIs Kafka 4 removed (4-7), which
    /// Cilium still names: a rule may name them, and such a frame is undecodable here.
    pub api: Option<ApiKey>,
    /// The canonical lower-case name, as Cilium spells it where Cilium names the key.
    pub name: &'static str,
}

/// Cilium's names where they differ from the lower-cased variant name.
const CILIUM_SPELLINGS: &[(ApiKey, &str)] = &[(ApiKey::ListOffsets, "offsets")];

/// Keys Cilium names that the codec (and Kafka 4) no longer knows.
const REMOVED: &[(i16, &str)] =
    &[(4, "leaderandisr"), (5, "stopreplica"), (6, "updatemetadata"), (7, "controlledshutdown")];

struct Table {
    apis: Vec<KafkaApi>,
    /// (accepted spelling, wire key), the lower-cased variant names and Cilium's spellings.
    names: Vec<(&'static str, i16)>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut apis = Vec::new();
        let mut names = Vec::new();
        for api in ApiKey::iter() {
            let variant: &'static str = format!("{api:?}").to_ascii_lowercase().leak();
            let name = CILIUM_SPELLINGS.iter().find(|(a, _)| *a == api).map(|(_, n)| *n).unwrap_or(variant);
            apis.push(KafkaApi { key: api as i16, api: Some(api), name });
            names.push((name, api as i16));
            if name != variant {
                names.push((variant, api as i16));
            }
        }
        for &(key, name) in REMOVED {
            apis.push(KafkaApi { key, api: None, name });
            names.push((name, key));
        }
        apis.sort_by_key(|a| a.key);
        Table { apis, names }
    })
}

/// Every API key policy can name, by wire key.
pub fn kafka_apis() -> &'static [KafkaApi] {
    &table().apis
}

/// The wire key of an API named in a policy (case-insensitive: Cilium's `offsets`, or the
/// lower-cased Kafka name such as `listoffsets`, `deletetopics`, `gettelemetrysubscriptions`).
pub fn kafka_api_key(name: &str) -> Option<i16> {
    let lower = name.to_ascii_lowercase();
    table().names.iter().find(|(n, _)| *n == lower).map(|(_, k)| *k)
}

/// The table entry of a wire key.
pub fn kafka_api(key: i16) -> Option<&'static KafkaApi> {
    table().apis.iter().find(|a| a.key == key)
}

/// Every accepted spelling, for error messages.
pub fn kafka_api_names() -> impl Iterator<Item = &'static str> {
    table().names.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_key_round_trips() {
        for api in ApiKey::iter() {
            let entry = kafka_api(api as i16).unwrap_or_else(|| panic!("{api:?} missing"));
            assert_eq!(entry.api, Some(api));
            assert_eq!(kafka_api_key(entry.name), Some(api as i16), "{}", entry.name);
            let variant = format!("{api:?}");
            assert_eq!(kafka_api_key(&variant), Some(api as i16), "{variant}");
            assert_eq!(kafka_api_key(&variant.to_ascii_uppercase()), Some(api as i16));
        }
        assert_eq!(kafka_apis().len(), ApiKey::iter().count() + REMOVED.len());
    }

    #[test]
    fn cilium_spellings_are_accepted() {
        let cilium = [
            "produce",
            "fetch",
            "offsets",
            "metadata",
            "leaderandisr",
            "stopreplica",
            "updatemetadata",
            "controlledshutdown",
            "offsetcommit",
            "offsetfetch",
            "findcoordinator",
            "joingroup",
            "heartbeat",
            "leavegroup",
            "syncgroup",
            "describegroups",
            "listgroups",
            "saslhandshake",
            "apiversions",
            "createtopics",
            "deletetopics",
            "deleterecords",
            "initproducerid",
            "offsetforleaderepoch",
            "addpartitionstotxn",
            "addoffsetstotxn",
            "endtxn",
            "writetxnmarkers",
            "txnoffsetcommit",
            "describeacls",
            "createacls",
            "deleteacls",
            "describeconfigs",
            "alterconfigs",
        ];
        for (key, name) in cilium.iter().enumerate() {
            assert_eq!(kafka_api_key(name), Some(key as i16), "{name}");
            assert_eq!(kafka_api(key as i16).unwrap().name, *name);
        }
        assert_eq!(kafka_api_key("listoffsets"), Some(2));
        assert_eq!(kafka_api_key("gettelemetrysubscriptions"), Some(71));
    }

    #[test]
    fn every_accepted_name_is_one_key_and_unknown_names_none() {
        for name in kafka_api_names() {
            let key = kafka_api_key(name).unwrap();
            assert!(kafka_api(key).is_some(), "{name} -> {key}");
        }
        let mut keys: Vec<_> = kafka_apis().iter().map(|a| a.key).collect();
        keys.dedup();
        assert_eq!(keys.len(), kafka_apis().len(), "one entry per key");
        for bad in ["", "*", "any", "delete-topics", "deletetopic", "produce ", "88", "0"] {
            assert_eq!(kafka_api_key(bad), None, "{bad:?}");
        }
    }
}
