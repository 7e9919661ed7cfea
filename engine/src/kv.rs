//! Paged KV-cache block accounting, pure Rust: a pool of fixed-size blocks with reference counts,
//! and automatic prefix caching (full blocks identified by a hash chained over the parent block's
//! hash, the block's tokens and the request's `cache_salt`; freed cached blocks stay reusable
//! until evicted in LRU order).
