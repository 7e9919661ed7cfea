//! Paged KV-cache block accounting, pure Rust: a pool of fixed-size blocks with reference counts,
//! and automatic prefix caching (full blocks identified by a hash chained over the parent block's
//! hash, the block's tokens and the request's `cache_salt`; freed cached blocks stay reusable
//! until evicted in LRU order).
//!
//! The pool knows nothing about executors or sequences: it hands out [`BlockId`]s, counts who
//! holds them and remembers which full blocks hold which content. A block is in exactly one of
//! three states: *used* (ref count > 0), *free* (ref count 0, no content worth keeping) or
//! *evictable* (ref count 0, registered in the prefix cache; reused by a later prefix hit, or
//! recycled least-recently-released first once the free blocks run out).

use std::collections::{BTreeMap, HashMap, VecDeque};

use sha2::{Digest, Sha256};

use crate::plan::BlockId;

/// Identity of a full block's content *in context*: SHA-256 chained over the parent block's
/// hash (or, for the first block, the request's `cache_salt`) and the block's token ids. Two
/// blocks with equal hashes hold equal keys and values, because attention at a position depends
/// only on the tokens up to it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash([u8; 32]);

impl BlockHash {
    /// Hash of one full block. `cache_salt` only matters for the first block (`parent == None`);
    /// later blocks inherit it through the chain.
    pub fn new(parent: Option<&BlockHash>, tokens: &[u32], cache_salt: Option<&str>) -> Self {
        let mut hasher = Sha256::new();
        // Tag bytes and lengths keep the encodings of different inputs from ever coinciding
        // (a salt vs. no salt, a salt's bytes vs. token bytes).
        match (parent, cache_salt) {
            (Some(parent), _) => {
                hasher.update([1u8]);
                hasher.update(parent.0);
            }
            (None, Some(salt)) => {
                hasher.update([2u8]);
                hasher.update((salt.len() as u64).to_le_bytes());
                hasher.update(salt.as_bytes());
            }
            (None, None) => hasher.update([0u8]),
        }
        hasher.update((tokens.len() as u64).to_le_bytes());
        for token in tokens {
            hasher.update(token.to_le_bytes());
        }
        BlockHash(hasher.finalize().into())
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Eight bytes are plenty to tell hashes apart in logs.
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Extends `hashes` (the chained hashes of the first `hashes.len()` full blocks of `tokens`) to
/// cover every full block of `tokens`. Incremental, so a growing sequence hashes each block once.
pub fn extend_block_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    block_size: usize,
    cache_salt: Option<&str>,
) {
    let full_blocks = tokens.len() / block_size;
    while hashes.len() < full_blocks {
        let index = hashes.len();
        let block_tokens = &tokens[index * block_size..(index + 1) * block_size];
        let hash = BlockHash::new(hashes.last(), block_tokens, cache_salt);
        hashes.push(hash);
    }
}

/// The chained hashes of every full block of `tokens`.
pub fn full_block_hashes(
    tokens: &[u32],
    block_size: usize,
    cache_salt: Option<&str>,
) -> Vec<BlockHash> {
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    extend_block_hashes(&mut hashes, tokens, block_size, cache_salt);
    hashes
}

/// Number of blocks needed to hold `num_tokens` token slots.
pub fn blocks_for(num_tokens: usize, block_size: usize) -> usize {
    num_tokens.div_ceil(block_size)
}

/// A pool of `num_blocks` KV blocks of `block_size` token slots each, with a prefix cache.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// The prefix-cache identity of each block, if registered.
    hashes: Vec<Option<BlockHash>>,
    /// Ref count 0, not in the cache: handed out before any cached block is evicted.
    free: VecDeque<BlockId>,
    /// Ref count 0, in the cache, keyed by release tick: the first entry is the least recently
    /// used. A BTreeMap gives ordered eviction and O(log n) removal on a prefix hit.
    evictable: BTreeMap<u64, BlockId>,
    /// The tick under which each evictable block sits in `evictable`.
    release_ticks: Vec<u64>,
    next_tick: u64,
    cached: HashMap<BlockHash, BlockId>,
    num_used: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "KV block size must be positive");
        assert!(
            num_blocks <= BlockId::MAX as usize,
            "{num_blocks} KV blocks do not fit a BlockId"
        );
        BlockPool {
            block_size,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            evictable: BTreeMap::new(),
            release_ticks: vec![0; num_blocks],
            next_tick: 0,
            cached: HashMap::new(),
            num_used: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_used
    }

    /// Blocks that [`allocate`](Self::allocate) can hand out: free ones plus evictable cached
    /// ones.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Cached blocks nobody holds (kept for future prefix hits).
    pub fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Fraction of blocks held by live sequences, 0..=1.
    pub fn usage(&self) -> f32 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        self.num_used as f32 / self.num_blocks() as f32
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// The prefix-cache identity of `block`, if it holds a registered full block.
    pub fn block_hash(&self, block: BlockId) -> Option<&BlockHash> {
        self.hashes[block as usize].as_ref()
    }

    /// The block registered under `hash`, whether held or evictable.
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        self.cached.get(hash).copied()
    }

    /// The blocks of the longest prefix of `hashes` found in the cache. Only looks: the caller
    /// takes the blocks with [`share`](Self::share).
    pub fn longest_cached_prefix(&self, hashes: &[BlockHash]) -> Vec<BlockId> {
        hashes.iter().map_while(|hash| self.lookup(hash)).collect()
    }

    /// Takes one block with ref count 1: a free block if any, else the least recently used
    /// evictable one, whose cache entry is dropped. `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop_front() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                if let Some(hash) = self.hashes[block as usize].take() {
                    self.cached.remove(&hash);
                }
                block
            }
        };
        self.ref_counts[block as usize] = 1;
        self.num_used += 1;
        Some(block)
    }

    /// Takes `count` blocks, all or none.
    pub fn allocate_many(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if self.num_available() < count {
            return None;
        }
        Some(
            (0..count)
                .map(|_| self.allocate().expect("availability checked above"))
                .collect(),
        )
    }

    /// One more holder of `block`: a block already held, or an evictable cached block revived
    /// by a prefix hit.
    pub fn share(&mut self, block: BlockId) {
        let index = block as usize;
        if self.ref_counts[index] == 0 {
            assert!(
                self.hashes[index].is_some(),
                "block {block} is free: only held or cached blocks can be shared"
            );
            self.evictable.remove(&self.release_ticks[index]);
            self.num_used += 1;
        }
        self.ref_counts[index] += 1;
    }

    /// One holder fewer. At ref count 0 a cached block becomes the most recently used evictable
    /// block; any other block becomes free.
    pub fn release(&mut self, block: BlockId) {
        let index = block as usize;
        assert!(
            self.ref_counts[index] > 0,
            "block {block} released more often than taken"
        );
        self.ref_counts[index] -= 1;
        if self.ref_counts[index] > 0 {
            return;
        }
        self.num_used -= 1;
        if self.hashes[index].is_some() {
            let tick = self.next_tick;
            self.next_tick += 1;
            self.release_ticks[index] = tick;
            self.evictable.insert(tick, block);
        } else {
            self.free.push_back(block);
        }
    }

    /// Releases a sequence's blocks, last block first: a later block is useless without its
    /// predecessors, so it should be the first to be evicted.
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            self.release(block);
        }
    }

    /// Registers held `block`, now full, under `hash`. Returns false (and changes nothing) when
    /// another block already holds that content or `block` is registered already: the cache keeps
    /// one block per content, and a duplicate simply returns to the free list when released.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> bool {
        let index = block as usize;
        assert!(
            self.ref_counts[index] > 0,
            "only a held block can be registered"
        );
        if self.hashes[index].is_some() || self.cached.contains_key(&hash) {
            return false;
        }
        self.hashes[index] = Some(hash);
        self.cached.insert(hash, block);
        true
    }

    /// Forgets every cached block nobody holds (e.g. after the weights changed), returning them
    /// to the free list.
    pub fn reset_prefix_cache(&mut self) {
        while let Some((_, block)) = self.evictable.pop_first() {
            if let Some(hash) = self.hashes[block as usize].take() {
                self.cached.remove(&hash);
            }
            self.free.push_back(block);
        }
    }

    /// Panics when the pool's internal books disagree; for tests and debugging.
    pub fn check_consistency(&self) {
        let held = self.ref_counts.iter().filter(|&&count| count > 0).count();
        assert_eq!(held, self.num_used, "used count");
        assert_eq!(
            held + self.free.len() + self.evictable.len(),
            self.num_blocks(),
            "every block is used, free or evictable"
        );
        for &block in &self.free {
            assert_eq!(self.ref_count(block), 0, "free block {block} is held");
            assert!(
                self.block_hash(block).is_none(),
                "free block {block} cached"
            );
        }
        for (&tick, &block) in &self.evictable {
            assert_eq!(self.ref_count(block), 0, "evictable block {block} is held");
            assert!(self.block_hash(block).is_some(), "evictable block uncached");
            assert_eq!(self.release_ticks[block as usize], tick, "stale LRU tick");
        }
        for (hash, &block) in &self.cached {
            assert_eq!(self.block_hash(block), Some(hash), "cache map disagrees");
        }
        let registered = self.hashes.iter().filter(|hash| hash.is_some()).count();
        assert_eq!(
            registered,
            self.cached.len(),
            "registered blocks vs cache map"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn allocation_and_freeing_return_the_pool_to_full() {
        let mut pool = BlockPool::new(8, 4);
        let taken = pool.allocate_many(5).unwrap();
        let distinct: std::collections::HashSet<_> = taken.iter().collect();
        assert_eq!(distinct.len(), 5);
        assert_eq!(pool.num_used(), 5);
        assert_eq!(pool.num_available(), 3);
        assert!((pool.usage() - 5.0 / 8.0).abs() < 1e-6);
        assert!(pool.allocate_many(4).is_none(), "all or nothing");
        assert_eq!(pool.num_available(), 3, "a refused request takes nothing");
        let rest = pool.allocate_many(3).unwrap();
        assert!(pool.allocate().is_none());
        pool.release_all(&taken);
        pool.release_all(&rest);
        assert_eq!(pool.num_used(), 0);
        assert_eq!(pool.num_available(), 8);
        assert_eq!(pool.usage(), 0.0);
        pool.check_consistency();
    }

    #[test]
    fn shared_prefix_blocks_are_ref_counted() {
        let mut pool = BlockPool::new(6, 4);
        let prompt = tokens(0..10); // two full blocks and a partial one
        let hashes = full_block_hashes(&prompt, 4, None);
        assert_eq!(hashes.len(), 2);
        let first = pool.allocate_many(3).unwrap();
        assert!(pool.register(first[0], hashes[0]));
        assert!(pool.register(first[1], hashes[1]));

        // A second sequence with the same prompt finds both full blocks.
        let hits = pool.longest_cached_prefix(&hashes);
        assert_eq!(hits, first[..2]);
        for &block in &hits {
            pool.share(block);
        }
        assert_eq!(pool.ref_count(first[0]), 2);
        assert_eq!(pool.ref_count(first[2]), 1);
        assert_eq!(pool.num_used(), 3, "sharing takes no new block");

        pool.release_all(&first);
        assert_eq!(pool.ref_count(first[0]), 1, "still held by the second");
        assert_eq!(pool.ref_count(first[2]), 0);
        assert_eq!(pool.num_used(), 2);
        pool.release_all(&hits);
        assert_eq!(pool.num_used(), 0);
        assert_eq!(pool.num_evictable(), 2, "cached blocks stay reusable");
        // An evictable block revives on a hit.
        assert_eq!(pool.longest_cached_prefix(&hashes), first[..2]);
        pool.share(first[0]);
        assert_eq!(pool.ref_count(first[0]), 1);
        assert_eq!(pool.num_evictable(), 1);
        pool.check_consistency();
    }

    #[test]
    fn lru_eviction_order() {
        let mut pool = BlockPool::new(3, 2);
        let blocks = pool.allocate_many(3).unwrap();
        let hashes: Vec<_> = (0..3u32)
            .map(|i| BlockHash::new(None, &[i, i], None))
            .collect();
        for (&block, &hash) in blocks.iter().zip(&hashes) {
            assert!(pool.register(block, hash));
        }
        // Released in the order 1, 0, 2: block 1 is the least recently used.
        pool.release(blocks[1]);
        pool.release(blocks[0]);
        pool.release(blocks[2]);
        // A hit on block 1 makes it held; released again it becomes the most recent.
        pool.share(blocks[1]);
        pool.release(blocks[1]);

        let first = pool.allocate().unwrap();
        assert_eq!(first, blocks[0]);
        assert_eq!(
            pool.lookup(&hashes[0]),
            None,
            "an evicted block's hash is dropped"
        );
        assert_eq!(pool.lookup(&hashes[2]), Some(blocks[2]));
        assert_eq!(pool.allocate(), Some(blocks[2]));
        assert_eq!(pool.allocate(), Some(blocks[1]));
        assert!(pool.block_hash(blocks[1]).is_none());
        pool.check_consistency();
    }

    #[test]
    fn free_blocks_go_before_cached_ones_and_tails_are_evicted_first() {
        let mut pool = BlockPool::new(4, 2);
        let seq = pool.allocate_many(3).unwrap();
        let hashes = full_block_hashes(&tokens(0..6), 2, None);
        for (&block, &hash) in seq.iter().zip(&hashes) {
            pool.register(block, hash);
        }
        pool.release_all(&seq);
        // The never-cached block goes first, then the sequence's tail, then its middle.
        let never_cached = pool.allocate().unwrap();
        assert!(!seq.contains(&never_cached));
        assert_eq!(pool.allocate(), Some(seq[2]));
        assert_eq!(pool.longest_cached_prefix(&hashes), seq[..2]);
        assert_eq!(pool.allocate(), Some(seq[1]));
        assert_eq!(pool.longest_cached_prefix(&hashes), seq[..1]);
    }

    #[test]
    fn cache_salt_isolates_prefixes() {
        let prompt = tokens(100..116);
        let plain = full_block_hashes(&prompt, 8, None);
        let alice = full_block_hashes(&prompt, 8, Some("alice"));
        let bob = full_block_hashes(&prompt, 8, Some("bob"));
        let empty = full_block_hashes(&prompt, 8, Some(""));
        for (a, b) in [(&plain, &alice), (&alice, &bob), (&plain, &empty)] {
            for (x, y) in a.iter().zip(b.iter()) {
                assert_ne!(x, y, "the salt reaches every block through the chain");
            }
        }
        assert_eq!(alice, full_block_hashes(&prompt, 8, Some("alice")));

        let mut pool = BlockPool::new(4, 8);
        let blocks = pool.allocate_many(2).unwrap();
        pool.register(blocks[0], alice[0]);
        pool.register(blocks[1], alice[1]);
        assert_eq!(pool.longest_cached_prefix(&alice).len(), 2);
        assert!(pool.longest_cached_prefix(&bob).is_empty());
        assert!(pool.longest_cached_prefix(&plain).is_empty());
    }

    #[test]
    fn hashes_chain_over_the_whole_prefix() {
        let a = full_block_hashes(&[1, 2, 3, 4, 5, 6], 2, None);
        let b = full_block_hashes(&[9, 2, 3, 4, 5, 6], 2, None);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0], b[0]);
        // Same tokens in blocks 1 and 2, different history: different identity.
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2]);
        // The partial block is not hashed; incremental extension matches a full recompute.
        let mut grown = full_block_hashes(&[1, 2, 3], 2, None);
        assert_eq!(grown.len(), 1);
        extend_block_hashes(&mut grown, &[1, 2, 3, 4, 5, 6, 7], 2, None);
        assert_eq!(grown, a);
        assert_eq!(blocks_for(0, 16), 0);
        assert_eq!(blocks_for(16, 16), 1);
        assert_eq!(blocks_for(17, 16), 2);
    }

    #[test]
    fn duplicate_content_is_registered_once() {
        let mut pool = BlockPool::new(3, 2);
        let hash = BlockHash::new(None, &[7, 7], None);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.register(a, hash));
        assert!(!pool.register(b, hash));
        assert!(!pool.register(a, BlockHash::new(None, &[8, 8], None)));
        pool.release(b);
        pool.release(a);
        assert_eq!(
            pool.num_evictable(),
            1,
            "the duplicate went back to the free list"
        );
        pool.reset_prefix_cache();
        assert_eq!(pool.num_evictable(), 0);
        assert_eq!(pool.lookup(&hash), None);
        pool.check_consistency();
    }
}
