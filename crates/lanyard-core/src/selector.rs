//! Selectors (`type:value`) and selector sets, with SPIRE's matching rule: an entry applies
//! to a workload when every one of the entry's selectors is in the workload's set.

use std::fmt;
use std::str::FromStr;

/// The longest selector type or value accepted, in bytes.
pub const MAX_SELECTOR_PART_LEN: usize = 1024;

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// There is no `:` between type and value.
    #[error("selector {0:?} must have the form type:value")]
    MissingSeparator(String),
    /// The type is empty.
    #[error("selector type cannot be empty")]
    EmptyType,
    /// The value is empty.
    #[error("selector value cannot be empty")]
    EmptyValue,
    /// The type contains a `:`, which would make the split ambiguous.
    #[error("selector type {0:?} cannot contain ':'")]
    ColonInType(String),
    /// The type or value holds a control character.
    #[error("selector cannot contain control characters")]
    ControlCharacter,
    /// The type or value is longer than [`MAX_SELECTOR_PART_LEN`].
    #[error("selector type or value is longer than {MAX_SELECTOR_PART_LEN} bytes")]
    TooLong,
}

/// One selector, e.g. `unix:uid:1000`: type `unix`, value `uid:1000`.
///
/// The type is everything before the first `:`; the value may contain more colons.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type and value.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if kind.contains(':') {
            return Err(SelectorError::ColonInType(kind.to_owned()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if kind.len() > MAX_SELECTOR_PART_LEN || value.len() > MAX_SELECTOR_PART_LEN {
            return Err(SelectorError::TooLong);
        }
        if kind.chars().chain(value.chars()).any(char::is_control) {
            return Err(SelectorError::ControlCharacter);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({}:{})", self.kind, self.value)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of selectors, ordered and without duplicates.
///
/// Kept as a sorted vector of exactly its length: an entry has a few selectors, and the
/// server holds an entry's set in memory for every entry it authorizes (a B-tree would
/// allocate a node of eleven for one selector).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SelectorSet {
    /// Sorted, without duplicates.
    selectors: Vec<Selector>,
}

impl<'de> serde::Deserialize<'de> for SelectorSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<Selector>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector; returns whether it was new.
    pub fn insert(&mut self, selector: Selector) -> bool {
        match self.selectors.binary_search(&selector) {
            Ok(_) => false,
            Err(at) => {
                self.selectors.insert(at, selector);
                true
            }
        }
    }

    /// Whether the set holds `selector`.
    pub fn contains(&self, selector: &Selector) -> bool {
        self.selectors.binary_search(selector).is_ok()
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.selectors.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty()
    }

    /// The selectors in order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.selectors.iter()
    }

    /// SPIRE's matching rule: whether an entry with these selectors applies to a workload (or
    /// agent) whose attested selectors are `attested`. True when every selector here is in
    /// `attested`. An empty set never matches, because an entry must have selectors.
    pub fn matches(&self, attested: &SelectorSet) -> bool {
        !self.is_empty() && self.is_subset(attested)
    }

    /// Whether every selector here is in `other` (plain subset; true for an empty set).
    pub fn is_subset(&self, other: &SelectorSet) -> bool {
        if self.selectors.len() > other.selectors.len() {
            return false;
        }
        // Both sorted: one walk through `other`.
        let mut theirs = other.selectors.iter();
        self.selectors
            .iter()
            .all(|mine| theirs.by_ref().any(|candidate| candidate == mine))
    }

    /// Whether the two sets share at least one selector.
    pub fn intersects(&self, other: &SelectorSet) -> bool {
        let (mut a, mut b) = (
            self.selectors.iter().peekable(),
            other.selectors.iter().peekable(),
        );
        while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
            match x.cmp(y) {
                std::cmp::Ordering::Less => {
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    b.next();
                }
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        let mut selectors: Vec<Selector> = iter.into_iter().collect();
        selectors.sort();
        selectors.dedup();
        selectors.shrink_to_fit();
        Self { selectors }
    }
}

impl IntoIterator for SelectorSet {
    type Item = Selector;
    type IntoIter = std::vec::IntoIter<Selector>;

    fn into_iter(self) -> Self::IntoIter {
        self.selectors.into_iter()
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;

    fn into_iter(self) -> Self::IntoIter {
        self.selectors.iter()
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.selectors.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> SelectorSet {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn value_may_contain_colons() {
        let s: Selector = "k8s:pod-label:app:web".parse().unwrap();
        assert_eq!(s.kind(), "k8s");
        assert_eq!(s.value(), "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
    }

    #[test]
    fn malformed_selectors_are_refused() {
        assert_eq!(
            "unix".parse::<Selector>(),
            Err(SelectorError::MissingSeparator("unix".into()))
        );
        assert_eq!(":uid:1".parse::<Selector>(), Err(SelectorError::EmptyType));
        assert_eq!("unix:".parse::<Selector>(), Err(SelectorError::EmptyValue));
        assert_eq!(
            Selector::new("a:b", "c"),
            Err(SelectorError::ColonInType("a:b".into()))
        );
        assert_eq!(
            "unix:uid\n1".parse::<Selector>(),
            Err(SelectorError::ControlCharacter)
        );
        let long = format!("unix:{}", "x".repeat(MAX_SELECTOR_PART_LEN + 1));
        assert_eq!(long.parse::<Selector>(), Err(SelectorError::TooLong));
    }

    #[test]
    fn entry_matches_when_its_selectors_are_a_subset() {
        let workload = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        assert!(set(&["unix:uid:1000"]).matches(&workload));
        assert!(set(&["unix:uid:1000", "unix:gid:1000"]).matches(&workload));
        assert!(!set(&["unix:uid:1000", "unix:gid:0"]).matches(&workload));
        assert!(!set(&["unix:uid:1001"]).matches(&workload));
        assert!(
            !SelectorSet::new().matches(&workload),
            "empty never matches"
        );
    }

    #[test]
    fn sets_dedupe_and_order() {
        let s = set(&["b:2", "a:1", "b:2"]);
        assert_eq!(s.len(), 2);
        let listed: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(listed, ["a:1", "b:2"]);
        assert!(s.intersects(&set(&["a:1", "c:3"])));
        assert!(!s.intersects(&set(&["c:3"])));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["a:1","b:2"]"#);
        assert_eq!(serde_json::from_str::<SelectorSet>(&json).unwrap(), s);
        // Whatever order and repetition a document has, the set is the same.
        assert_eq!(
            serde_json::from_str::<SelectorSet>(r#"["b:2","a:1","b:2"]"#).unwrap(),
            s
        );
    }

    #[test]
    fn set_operations_agree_with_a_reference_set() {
        use std::collections::BTreeSet;
        let pool: Vec<Selector> = ["a:1", "a:2", "b:1", "k8s:ns:x", "unix:uid:0", "z:9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Every pair of subsets of the pool, by bit mask.
        let subsets = |mask: u32| -> (SelectorSet, BTreeSet<Selector>) {
            let chosen: Vec<Selector> = pool
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, s)| s.clone())
                .collect();
            (
                chosen.iter().rev().cloned().collect(),
                chosen.into_iter().collect(),
            )
        };
        for a in 0..64 {
            let (set_a, ref_a) = subsets(a);
            for b in 0..64 {
                let (set_b, ref_b) = subsets(b);
                assert_eq!(set_a.is_subset(&set_b), ref_a.is_subset(&ref_b), "{a} {b}");
                assert_eq!(
                    set_a.intersects(&set_b),
                    !ref_a.is_disjoint(&ref_b),
                    "{a} {b}"
                );
                assert_eq!(set_a.cmp(&set_b), ref_a.cmp(&ref_b), "{a} {b}");
            }
            let mut grown = SelectorSet::new();
            for selector in ref_a.iter().rev() {
                assert!(grown.insert(selector.clone()));
                assert!(!grown.insert(selector.clone()));
            }
            assert_eq!(grown, set_a);
            assert!(ref_a.iter().all(|s| set_a.contains(s)));
        }
    }
}
