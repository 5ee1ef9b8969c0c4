//! The owner's record of where copies of its objects live. Nodes report the copies they gain
//! and lose; lookups answer from here. Pure bookkeeping.

use std::collections::{BTreeSet, HashMap};

use crate::id::ObjectId;

/// Most holders remembered per object (enough to spread reads; more add nothing).
pub const MAX_HOLDERS: usize = 64;

/// Copies of this node's objects on other nodes.
#[derive(Debug, Default)]
pub struct Directory {
    copies: HashMap<ObjectId, BTreeSet<u64>>,
}

impl Directory {
    /// `node` holds a sealed copy of `id`.
    pub fn add(&mut self, id: ObjectId, node: u64) {
        let set = self.copies.entry(id).or_default();
        if set.len() < MAX_HOLDERS {
            set.insert(node);
        }
    }

    /// `node` dropped its copy of `id`.
    pub fn remove(&mut self, id: &ObjectId, node: u64) {
        if let Some(set) = self.copies.get_mut(id) {
            set.remove(&node);
            if set.is_empty() {
                self.copies.remove(id);
            }
        }
    }

    /// The nodes holding copies of `id`.
    pub fn holders(&self, id: &ObjectId) -> Vec<u64> {
        self.copies
            .get(id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// `id` was deleted: forget it and return who held copies.
    pub fn take(&mut self, id: &ObjectId) -> Vec<u64> {
        self.copies
            .remove(id)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default()
    }

    /// `node` died: it holds nothing any more.
    pub fn forget_node(&mut self, node: u64) {
        self.copies.retain(|_, s| {
            s.remove(&node);
            !s.is_empty()
        });
    }

    /// Objects with copies elsewhere.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether no object has copies elsewhere.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;

    #[test]
    fn add_remove_take_forget() {
        let a = ObjectId::new(NodeId(1), [1; 16]);
        let b = ObjectId::new(NodeId(1), [2; 16]);
        let mut d = Directory::default();
        d.add(a, 2);
        d.add(a, 3);
        d.add(b, 3);
        assert_eq!(d.holders(&a), vec![2, 3]);
        d.remove(&a, 2);
        assert_eq!(d.holders(&a), vec![3]);
        d.forget_node(3);
        assert!(d.is_empty());
        d.add(a, 4);
        assert_eq!(d.take(&a), vec![4]);
        assert!(d.holders(&a).is_empty());
    }
}
