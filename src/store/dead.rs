//! Dead letters of the MQTT bridge, in sled tree `dead`: messages it took
//! from a broker and could not store (not JSON, too big, on a topic no rule
//! takes, refused by the doc). Kept so that nothing taken is lost unseen;
//! the records are opaque bytes here (`crate::mqtt` owns their format).
//!
//! Keys: the letter's id, u64 big-endian (increasing across restarts).

use super::{Store, StoreError};

/// Dead letters kept; past this the oldest go.
pub const MAX_DEAD: usize = 10_000;

impl Store {
    fn dead_tree(&self) -> Result<sled::Tree, StoreError> {
        self.db.open_tree("dead").map_err(|e| self.sled_err(e))
    }

    /// Stores a dead letter and flushes it (the bridge acknowledges the
    /// message to its broker after this); drops the oldest past
    /// [`MAX_DEAD`]. Returns its id.
    ///
    /// # Errors
    /// sled errors.
    pub fn put_dead_letter(&self, record: &[u8]) -> Result<u64, StoreError> {
        self.check_writable()?;
        let tree = self.dead_tree()?;
        let id = self.db.generate_id().map_err(|e| self.sled_err(e))? + 1;
        tree.insert(id.to_be_bytes(), record)
            .map_err(|e| self.sled_err(e))?;
        while tree.len() > MAX_DEAD {
            match tree.pop_min().map_err(|e| self.sled_err(e))? {
                Some(_) => {}
                None => break,
            }
        }
        tree.flush().map_err(|e| self.sled_err(e))?;
        Ok(id)
    }

    /// Up to `limit` dead letters, newest first, with ids below `before`.
    ///
    /// # Errors
    /// sled errors.
    pub fn dead_letters(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tree = self.dead_tree()?;
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        let mut out = Vec::new();
        for item in tree.range(..end).rev().take(limit) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let id = u64::from_be_bytes(k.as_ref().try_into().unwrap_or_default());
            out.push((id, v.to_vec()));
        }
        Ok(out)
    }

    /// How many dead letters are kept.
    ///
    /// # Errors
    /// sled errors.
    pub fn dead_letter_count(&self) -> Result<usize, StoreError> {
        Ok(self.dead_tree()?.len())
    }

    /// Removes dead letter `id` (handled); false if there was none.
    ///
    /// # Errors
    /// sled errors.
    pub fn remove_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        self.check_writable()?;
        let tree = self.dead_tree()?;
        let had = tree
            .remove(id.to_be_bytes())
            .map_err(|e| self.sled_err(e))?
            .is_some();
        Ok(had)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letters_are_kept_newest_first_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::Store::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<u64> = (0..5)
            .map(|i| store.put_dead_letter(format!("{i}").as_bytes()).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let page = store.dead_letters(2, None).unwrap();
        assert_eq!(
            page.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            [b"4".to_vec(), b"3".to_vec()]
        );
        let next = store.dead_letters(10, Some(page[1].0)).unwrap();
        assert_eq!(next.len(), 3);
        assert!(store.remove_dead_letter(ids[0]).unwrap());
        assert!(!store.remove_dead_letter(ids[0]).unwrap());
        assert_eq!(store.dead_letter_count().unwrap(), 4);
    }
}
