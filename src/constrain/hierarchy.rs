//! A terminology's is-a hierarchy and reference sets (SNOMED CT's relationships and simple
//! refsets), indexed for the walks an ECL expression asks for.

use std::collections::HashMap;

/// Concepts numbered densely, with their is-a parents and children and the refsets they
/// belong to.
#[derive(Debug, Clone, Default)]
pub struct Hierarchy {
    ids: Vec<String>,
    index: HashMap<String, u32>,
    parents: Vec<Vec<u32>>,
    children: Vec<Vec<u32>>,
    /// Refset id -> its members.
    refsets: HashMap<u32, Vec<u32>>,
    /// Concept number -> index of its terminology entry ([`NO_ENTRY`] for none).
    entries: Vec<u32>,
}

/// A concept without an entry (no active description).
const NO_ENTRY: u32 = u32::MAX;

impl Hierarchy {
    /// The number of a concept, adding it when new.
    pub fn intern(&mut self, id: &str) -> u32 {
        if let Some(&n) = self.index.get(id) {
            return n;
        }
        let n = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.index.insert(id.to_string(), n);
        self.parents.push(Vec::new());
        self.children.push(Vec::new());
        self.entries.push(NO_ENTRY);
        n
    }

    /// Records that concept `id` is entry `index` of its terminology.
    pub fn set_entry(&mut self, id: &str, index: usize) {
        let n = self.intern(id);
        self.entries[n as usize] = index as u32;
    }

    /// The terminology entry of concept number `n`, if it has one.
    pub fn entry(&self, n: u32) -> Option<usize> {
        let i = self.entries[n as usize];
        (i != NO_ENTRY).then_some(i as usize)
    }

    /// Records `child` is-a `parent` (nothing for a concept and itself: an ICD-10-CM block of
    /// one category, like `B10`, has the category's code).
    pub fn add_is_a(&mut self, child: &str, parent: &str) {
        if child == parent {
            return;
        }
        let (c, p) = (self.intern(child), self.intern(parent));
        if !self.parents[c as usize].contains(&p) {
            self.parents[c as usize].push(p);
            self.children[p as usize].push(c);
        }
    }

    /// Records `member` in refset `refset`.
    pub fn add_member(&mut self, refset: &str, member: &str) {
        let (r, m) = (self.intern(refset), self.intern(member));
        self.refsets.entry(r).or_default().push(m);
    }

    /// How many concepts are known.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no concept is known.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The number of concept `id`, if known.
    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The id of concept number `n`.
    pub fn id(&self, n: u32) -> &str {
        &self.ids[n as usize]
    }

    /// Ids of the direct parents of `id`.
    pub fn parents_of(&self, id: &str) -> Vec<&str> {
        self.get(id)
            .map(|n| self.parents[n as usize].iter().map(|&p| self.id(p)).collect())
            .unwrap_or_default()
    }

    /// Ids of the direct children of `id`.
    pub fn children_of(&self, id: &str) -> Vec<&str> {
        self.get(id)
            .map(|n| self.children[n as usize].iter().map(|&c| self.id(c)).collect())
            .unwrap_or_default()
    }

    /// Whether `refset` has members.
    pub fn is_refset(&self, n: u32) -> bool {
        self.refsets.contains_key(&n)
    }

    /// Members of refset `n`.
    pub fn members(&self, n: u32) -> &[u32] {
        self.refsets.get(&n).map(Vec::as_slice).unwrap_or_default()
    }

    /// Ids of the refsets that have members.
    pub fn refset_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.refsets.keys().map(|&r| self.id(r)).collect();
        ids.sort_unstable();
        ids
    }

    /// Direct children (`down`) or parents of concept `n`.
    pub fn neighbours(&self, n: u32, down: bool) -> &[u32] {
        if down {
            &self.children[n as usize]
        } else {
            &self.parents[n as usize]
        }
    }

    /// Everything reachable from `start` going `down` (descendants) or up (ancestors), not
    /// counting `start` itself unless a cycle leads back to it.
    pub fn closure(&self, start: &[u32], down: bool, into: &mut [bool]) {
        let mut stack: Vec<u32> = start.iter().flat_map(|&n| self.neighbours(n, down)).copied().collect();
        while let Some(n) = stack.pop() {
            if !std::mem::replace(&mut into[n as usize], true) {
                stack.extend_from_slice(self.neighbours(n, down));
            }
        }
    }
}
