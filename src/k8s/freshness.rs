//! Whether a reconcile may plan on the watch cache's copy of its object, or must read it
//! from the apiserver.
//!
//! The cache can lag the controller's own last status write, and planning on a status older
//! than our last decision would undo it. Reading every object fresh on every reconcile is
//! safe but costs one GET per Rollout per resync (the idle cost that grew with N). So the
//! controller remembers, per object, the resource version its last write produced, and reads
//! fresh only until the cache shows that version. Resource versions are compared for
//! equality only, as the API conventions ask: when someone else writes in between and the
//! cache skips ours, the next fresh read's version is awaited instead. The map holds only
//! objects with a write the cache has not shown yet: it empties itself when all is quiet.

use std::collections::HashMap;
use std::sync::Mutex;

/// Where to read the object from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Cache,
    Fresh,
}

/// The rule: the cache is good once it shows the version we await (or we await none).
pub fn decide(awaited: Option<&str>, cached: Option<&str>) -> Read {
    match awaited {
        None => Read::Cache,
        Some(rv) if Some(rv) == cached => Read::Cache,
        Some(_) => Read::Fresh,
    }
}

/// At most this many versions are remembered as coming before an answer.
const BEFORE_KEPT: usize = 8;

/// Versions known to come before the answer to one of Sluice's writes, oldest first: while the
/// cache shows one of them, the answer is the newest the operator can know
/// (rollout/written.rs, traffic/cache.rs).
#[derive(Debug, Default)]
pub struct Before(Vec<String>);

impl Before {
    /// Adds `version`, once; past [`BEFORE_KEPT`] the first added is forgotten.
    pub fn add(&mut self, version: Option<String>) {
        let Some(version) = version else { return };
        if !self.0.contains(&version) {
            if self.0.len() == BEFORE_KEPT {
                self.0.remove(0);
            }
            self.0.push(version);
        }
    }

    /// Adds each of `other`'s, oldest first.
    pub fn add_all(&mut self, other: &Before) {
        other.0.iter().for_each(|v| self.add(Some(v.clone())));
    }

    pub fn has(&self, version: Option<&str>) -> bool {
        version.is_some_and(|v| self.0.iter().any(|b| b == v))
    }
}

/// The versions awaited, by object key (`namespace/name`).
#[derive(Debug, Default)]
pub struct Freshness {
    awaited: Mutex<HashMap<String, String>>,
}

impl Freshness {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, String>) -> T) -> T {
        let mut awaited = self
            .awaited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut awaited)
    }

    /// Where to read `key` from, given the cached copy's resource version. `Cache` is about
    /// the cache as it is after this call, which [`Freshness::seen`] may have moved past
    /// `cached` (it is told only once the cache shows the version): the copy planned on is
    /// taken after it, not before.
    pub fn read(&self, key: &str, cached: Option<&str>) -> Read {
        self.with(|awaited| {
            let read = decide(awaited.get(key).map(String::as_str), cached);
            if read == Read::Cache {
                awaited.remove(key);
            }
            read
        })
    }

    /// A fresh read returned version `fresh`: the cache is good once it shows that.
    pub fn read_fresh(&self, key: &str, fresh: Option<&str>, cached: Option<&str>) {
        self.with(|awaited| match fresh {
            Some(rv) if Some(rv) != cached => {
                awaited.insert(key.to_string(), rv.to_string());
            }
            _ => {
                awaited.remove(key);
            }
        });
    }

    /// This controller wrote version `rv` of `key`.
    pub fn wrote(&self, key: &str, rv: &str) {
        self.with(|awaited| awaited.insert(key.to_string(), rv.to_string()));
    }

    /// The version awaited for `key`, if any.
    pub fn awaited(&self, key: &str) -> Option<String> {
        self.with(|awaited| awaited.get(key).cloned())
    }

    /// The object is gone.
    pub fn forget(&self, key: &str) {
        self.with(|awaited| awaited.remove(key));
    }

    /// The cache shows version `rv` of `key`: a write awaited at it is no longer awaited, even
    /// if nothing reads the object again.
    pub fn seen(&self, key: &str, rv: &str) {
        self.with(|awaited| {
            if awaited.get(key).is_some_and(|a| a == rv) {
                awaited.remove(key);
            }
        });
    }

    /// Someone else wrote `key` since the cached copy was read (a write was refused as a
    /// conflict): the next read is fresh, and its version is awaited from then on.
    pub fn distrust(&self, key: &str) {
        // Resource versions are never empty, so the cache never shows this one.
        self.with(|awaited| awaited.insert(key.to_string(), String::new()));
    }

    /// Whether no object awaits its cache.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.with(|awaited| awaited.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_comes_before_is_bounded_and_kept_once() {
        let mut before = Before::default();
        for v in (0..=BEFORE_KEPT).chain([3, 4]) {
            before.add(Some(v.to_string()));
        }
        before.add(None);
        assert_eq!(before.0.len(), BEFORE_KEPT);
        assert!(!before.has(Some("0")), "the first added is forgotten");
        assert!(before.has(Some("1")) && before.has(Some(&BEFORE_KEPT.to_string())));
        assert!(!before.has(None));
    }

    #[test]
    fn the_cache_is_used_once_it_shows_the_awaited_version() {
        let cases = [
            (None, Some("5"), Read::Cache),
            (None, None, Read::Cache),
            (Some("7"), Some("7"), Read::Cache),
            (Some("7"), Some("5"), Read::Fresh),
            (Some("7"), Some("9"), Read::Fresh),
            (Some("7"), None, Read::Fresh),
        ];
        for (awaited, cached, want) in cases {
            assert_eq!(decide(awaited, cached), want, "{awaited:?} {cached:?}");
        }
    }

    #[test]
    fn a_write_is_awaited_until_the_cache_shows_it_then_forgotten() {
        let f = Freshness::default();
        assert_eq!(f.read("a/r", Some("5")), Read::Cache);
        f.wrote("a/r", "6");
        assert_eq!(f.read("a/r", Some("5")), Read::Fresh);
        // Someone wrote after us: the fresh read's version is awaited now.
        f.read_fresh("a/r", Some("8"), Some("5"));
        assert_eq!(f.read("a/r", Some("6")), Read::Fresh);
        assert_eq!(f.read("a/r", Some("8")), Read::Cache);
        assert!(f.is_empty(), "nothing awaited when quiet");
        // A fresh read equal to the cache awaits nothing.
        f.wrote("a/r", "9");
        f.read_fresh("a/r", Some("9"), Some("9"));
        assert!(f.is_empty());
        f.wrote("a/r", "10");
        f.forget("a/r");
        assert!(f.is_empty());
        // Seen by the cache, though nobody read it: forgotten; another version is not enough.
        f.wrote("a/r", "11");
        f.seen("a/r", "10");
        assert_eq!(f.read("a/r", Some("10")), Read::Fresh);
        f.seen("a/r", "11");
        assert!(f.is_empty());
        // Distrusted: fresh whatever the cache shows, until a fresh read.
        f.distrust("a/r");
        assert_eq!(f.read("a/r", Some("11")), Read::Fresh);
        f.read_fresh("a/r", Some("12"), Some("11"));
        assert_eq!(f.read("a/r", Some("12")), Read::Cache);
    }
}
