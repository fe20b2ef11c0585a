//! The API keys file (`--api-keys-file`): one entry per key, each naming its tenant and its
//! limits. TOML, so comments and review diffs read well:
//!
//! ```toml
//! [[keys]]
//! name = "radiology"        # the tenant: metrics label, audit actor
//! key = "sk-radiology-..."  # what clients send as `Authorization: Bearer ...`
//! requests_per_second = 20
//! max_concurrent_requests = 8
//! tokens_per_minute = 200000
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, bail};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::limits::{KeyLimits, Limiter};

/// Shortest key accepted from the file: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// One key as the file writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: String,
    requests_per_second: Option<f64>,
    max_concurrent_requests: Option<u32>,
    tokens_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

/// A key the server accepts.
pub struct ApiKey {
    /// The tenant's name.
    pub name: Arc<str>,
    secret: Vec<u8>,
    /// Its limits' live state.
    pub limiter: Arc<Limiter>,
}

/// Every key the server accepts now.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<ApiKey>,
}

impl Keyring {
    /// Parses a keys file; `previous` lends its limiters (their buckets and running requests)
    /// to keys whose name and limits did not change, so a reload does not reset them.
    pub fn parse(text: &str, previous: Option<&Keyring>) -> Result<Self> {
        let file: KeysFile = toml::from_str(text)?;
        let mut keyring = Keyring::default();
        let old: HashMap<&str, &Arc<Limiter>> = previous
            .map(|p| p.keys.iter().map(|k| (&*k.name, &k.limiter)).collect())
            .unwrap_or_default();
        for entry in file.keys {
            if entry.key.len() < MIN_KEY_LEN {
                bail!("the key of {:?} is shorter than {MIN_KEY_LEN} characters", entry.name);
            }
            let limits = KeyLimits {
                requests_per_second: entry.requests_per_second,
                max_concurrent_requests: entry.max_concurrent_requests,
                tokens_per_minute: entry.tokens_per_minute,
            };
            let limiter = match old.get(entry.name.as_str()) {
                Some(limiter) if *limiter.settings() == limits => Arc::clone(limiter),
                _ => Arc::new(Limiter::new(limits).map_err(|e| anyhow::anyhow!("key {:?}: {e}", entry.name))?),
            };
            keyring.add(&entry.name, entry.key, limiter)?;
        }
        Ok(keyring)
    }

    /// Adds a key (the `--api-key` flag's is named `default`).
    pub fn add(&mut self, name: &str, secret: String, limiter: Arc<Limiter>) -> Result<()> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("key name {name:?}: use letters, digits, '-', '_' or '.'");
        }
        if self.keys.iter().any(|k| &*k.name == name) {
            bail!("two keys are named {name:?}");
        }
        if self.keys.iter().any(|k| k.secret == secret.as_bytes()) {
            bail!("key {name:?} repeats another key's secret");
        }
        self.keys.push(ApiKey {
            name: name.into(),
            secret: secret.into_bytes(),
            limiter,
        });
        Ok(())
    }

    /// Whether no key is configured (the model routes are then open).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key whose secret is `given`. Every key is compared in full, in constant time, so
    /// the time taken tells nothing about which key or how much of one matched.
    pub fn find(&self, given: &str) -> Option<&ApiKey> {
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.secret.ct_eq(given.as_bytes())) {
                found = Some(key);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[keys]]
name = "radiology"
key = "sk-radiology-0123456789"
requests_per_second = 5

[[keys]]
name = "trading"
key = "sk-trading-0123456789"
"#;

    #[test]
    fn keys_are_found_by_secret_and_reloads_keep_unchanged_limiters() {
        let ring = Keyring::parse(FILE, None).unwrap();
        assert_eq!(&*ring.find("sk-trading-0123456789").unwrap().name, "trading");
        assert!(ring.find("sk-trading-012345678").is_none() && ring.find("").is_none());
        let again = Keyring::parse(FILE, Some(&ring)).unwrap();
        let (a, b) = (
            ring.find("sk-radiology-0123456789").unwrap(),
            again.find("sk-radiology-0123456789").unwrap(),
        );
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        let changed = Keyring::parse(&FILE.replace("= 5", "= 6"), Some(&ring)).unwrap();
        assert!(!Arc::ptr_eq(
            &a.limiter,
            &changed.find("sk-radiology-0123456789").unwrap().limiter
        ));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, reason) in [
            ("[[keys]]\nname = \"a\"\nkey = \"short\"\n", "shorter"),
            (&*FILE.replace("trading\"", "radiology\""), "two keys"),
            (&*FILE.replace("sk-trading", "sk-radiology"), "repeats"),
            ("[[keys]]\nname = \"a b\"\nkey = \"0123456789abcdefgh\"\n", "key name"),
            (
                "[[keys]]\nname = \"a\"\nkey = \"0123456789abcdefgh\"\nrequests_per_second = 0\n",
                "requests_per_second",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"0123456789abcdefgh\"\nrps = 1\n",
                "unknown field",
            ),
        ] {
            let e = format!("{:#}", Keyring::parse(text, None).err().unwrap());
            assert!(e.contains(reason), "{text}: {e}");
        }
    }
}
