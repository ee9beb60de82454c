//! The page store: the latest content of every page the source sent on the pages stream, by (pid on the
//! source, address), in memory. Pre-copy rounds and the final delta update it; after the restore the
//! lazy-pages daemon ([`crate::lazy`]) fills the restored tasks' memory from it.
//!
//! A page the store does not hold is a zero page (the source never sends zero pages, and sends "zero
//! now" for a page that became zero). Pages live in slabs of [`SLAB_PAGES`] pages allocated as needed;
//! slots of pages that became zero are reused. The store refuses to grow past its limit (the host's
//! available memory when the migration was prepared), so a peer cannot exhaust this host's memory.

use std::collections::HashMap;
use std::sync::RwLock;

use protocol::pages::PAGE_SIZE;
use protocol::pb;

/// Pages per slab: 2 MiB.
pub const SLAB_PAGES: usize = 512;

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "the page store would grow past {limit} bytes (this host's available memory when the migration started); choose a target with more free memory"
    )]
    Full { limit: u64 },
    #[error("pages stream: a copy of page {pid}:{vaddr:#x}, which this host does not hold")]
    UnknownCopySource { pid: u32, vaddr: u64 },
    #[error("pages stream: {0}")]
    Malformed(String),
}

#[derive(Default)]
struct Inner {
    index: HashMap<(u32, u64), u32>,
    slabs: Vec<Box<[u8]>>,
    free: Vec<u32>,
    next: u32,
}

impl Inner {
    fn slot(&self, slot: u32) -> &[u8] {
        let (s, o) = (slot as usize / SLAB_PAGES, slot as usize % SLAB_PAGES);
        &self.slabs[s][o * PAGE_SIZE..(o + 1) * PAGE_SIZE]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let (s, o) = (slot as usize / SLAB_PAGES, slot as usize % SLAB_PAGES);
        &mut self.slabs[s][o * PAGE_SIZE..(o + 1) * PAGE_SIZE]
    }

    /// The slot of `key`, allocated if new.
    fn slot_for(&mut self, key: (u32, u64), limit: u64) -> Result<u32, StoreError> {
        if let Some(&s) = self.index.get(&key) {
            return Ok(s);
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                if self.next as usize == self.slabs.len() * SLAB_PAGES {
                    if ((self.slabs.len() + 1) * SLAB_PAGES * PAGE_SIZE) as u64 > limit {
                        return Err(StoreError::Full { limit });
                    }
                    self.slabs.push(vec![0u8; SLAB_PAGES * PAGE_SIZE].into_boxed_slice());
                }
                self.next += 1;
                self.next - 1
            }
        };
        self.index.insert(key, s);
        Ok(s)
    }
}

/// See the module doc.
pub struct PageStore {
    inner: RwLock<Inner>,
    limit: u64,
}

impl PageStore {
    /// A store that holds at most `limit` bytes of pages.
    pub fn new(limit: u64) -> Self {
        PageStore { inner: RwLock::new(Inner::default()), limit }
    }

    /// Applies one batch of the pages stream: `data` holds the bytes of `batch.data` pages in order.
    pub fn apply(&self, batch: &pb::PageBatch, data: &[u8]) -> Result<(), StoreError> {
        if data.len() != batch.data.len() * PAGE_SIZE {
            return Err(StoreError::Malformed(format!("{} bytes for {} data pages", data.len(), batch.data.len())));
        }
        let mut inner = self.inner.write().expect("page store lock");
        for (i, &vaddr) in batch.data.iter().enumerate() {
            let s = inner.slot_for((batch.pid, vaddr), self.limit)?;
            inner.slot_mut(s).copy_from_slice(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        for c in &batch.copies {
            let &from = inner
                .index
                .get(&(c.from_pid, c.from_vaddr))
                .ok_or(StoreError::UnknownCopySource { pid: c.from_pid, vaddr: c.from_vaddr })?;
            let to = inner.slot_for((batch.pid, c.vaddr), self.limit)?;
            if to != from {
                let page: Vec<u8> = inner.slot(from).to_vec();
                inner.slot_mut(to).copy_from_slice(&page);
            }
        }
        for &vaddr in &batch.zero {
            if let Some(s) = inner.index.remove(&(batch.pid, vaddr)) {
                inner.free.push(s);
            }
        }
        Ok(())
    }

    /// Copies page `vaddr` of `pid` into `out`; false when the store does not hold it (a zero page).
    pub fn read(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        let inner = self.inner.read().expect("page store lock");
        match inner.index.get(&(pid, vaddr)) {
            Some(&s) => {
                out[..PAGE_SIZE].copy_from_slice(inner.slot(s));
                true
            }
            None => false,
        }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.inner.read().expect("page store lock").index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::lazy::PageSource for PageStore {
    fn read_page(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> bool {
        self.read(pid, vaddr, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    #[test]
    fn data_copies_and_zeros() {
        let s = PageStore::new(1 << 30);
        let data = [page(1), page(2)].concat();
        s.apply(&pb::PageBatch { pid: 5, data: vec![0x1000, 0x2000], ..Default::default() }, &data).unwrap();
        let copy = pb::PageCopy { from_pid: 5, from_vaddr: 0x2000, vaddr: 0x8000 };
        s.apply(&pb::PageBatch { pid: 6, copies: vec![copy], zero: vec![0x9000], ..Default::default() }, &[]).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(s.read(6, 0x8000, &mut out) && out == page(2));
        s.apply(&pb::PageBatch { pid: 5, data: vec![0x2000], zero: vec![0x1000], ..Default::default() }, &page(3))
            .unwrap();
        assert!(s.read(5, 0x2000, &mut out) && out == page(3));
        assert!(s.read(6, 0x8000, &mut out) && out == page(2), "a copy is a copy, not a reference");
        assert!(!s.read(5, 0x1000, &mut out), "zeroed pages are forgotten");
        assert_eq!(s.len(), 2);
        // The freed slot is reused.
        s.apply(&pb::PageBatch { pid: 7, data: vec![0], ..Default::default() }, &page(4)).unwrap();
        assert_eq!(s.inner.read().unwrap().next, 3);
    }

    #[test]
    fn hostile_batches_are_refused() {
        let s = PageStore::new((SLAB_PAGES * PAGE_SIZE) as u64);
        let copy = pb::PageCopy { from_pid: 1, from_vaddr: 0, vaddr: 0x1000 };
        let e = s.apply(&pb::PageBatch { pid: 1, copies: vec![copy], ..Default::default() }, &[]).unwrap_err();
        assert_eq!(e, StoreError::UnknownCopySource { pid: 1, vaddr: 0 });
        let e = s.apply(&pb::PageBatch { pid: 1, data: vec![0], ..Default::default() }, &[]).unwrap_err();
        assert!(matches!(e, StoreError::Malformed(_)));
        let many: Vec<u64> = (0..SLAB_PAGES as u64 + 1).map(|i| i * PAGE_SIZE as u64).collect();
        let data = vec![1u8; many.len() * PAGE_SIZE];
        let e = s.apply(&pb::PageBatch { pid: 1, data: many, ..Default::default() }, &data).unwrap_err();
        assert!(e.to_string().contains("more free memory"), "{e}");
    }
}
