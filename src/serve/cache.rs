//! The server's prefix cache: the KV caches of earlier requests, kept under a memory budget.
//!
//! An agent framework sends the whole conversation on every step, so consecutive requests share
//! their beginning (system text, tool list, earlier turns). The cache keeps up to `capacity`
//! sessions; a request starts from a copy of the one whose cache holds the longest prefix of its
//! prompt computed with the base weights (which every adapter may reuse: activated LoRA), so only
//! what is new is computed. Positions made under an adapter are reused by that adapter only
//! ([`Session`] tracks who made each).
//!
//! Requests running at once that share a prefix each get a copy of it (a GPU copy of the cached
//! positions, far cheaper than computing them); the copy, not the original, is what they extend.
//! Every session lives in a slot of one [`KvPool`] (the running ones and the kept ones), so a
//! pass runs RoPE, the KV store and attention once for all its sequences. Copies were chosen over
//! paged KV blocks with reference counts: each slot holds a sequence's positions contiguously
//! (the kernels index a row's keys as its slot's first row plus the position, no page table),
//! and a copy of a 1,000-token prefix costs a few milliseconds where computing it costs seconds. A finished request's session goes back into the cache and
//! replaces the sessions it extends; beyond `capacity`, the least recently used is dropped.
//! llama.cpp's server keeps one such cache per slot and picks the slot by prefix similarity in
//! the same way.

use crate::batch::Batcher;
use crate::error::Result;
use crate::kv::KvPool;
use crate::session::Session;

/// Sessions kept across requests, each with the time it was last used.
pub(super) struct PrefixCache<'m> {
    batcher: &'m Batcher<'m>,
    pool: KvPool,
    capacity: usize,
    slots: Vec<(Session<'m>, u64)>,
    clock: u64,
}

impl<'m> PrefixCache<'m> {
    /// Room for `capacity` sessions (0: nothing kept, every request starts from an empty cache),
    /// new ones and copies made from `pool` (sized for the requests running and the kept ones).
    pub fn new(batcher: &'m Batcher<'m>, pool: KvPool, capacity: usize) -> Self {
        Self { batcher, pool, capacity, slots: Vec::new(), clock: 0 }
    }

    /// A session for a request whose prompt begins with `prefix` (computed with the base
    /// weights), and how many of those tokens it already holds.
    pub fn checkout(&mut self, prefix: &[u32]) -> Result<(Session<'m>, usize)> {
        self.clock += 1;
        // The session holding the longest prefix, the most recently used among equals.
        let best = self.slots.iter().enumerate().map(|(i, (s, used))| (s.cached_prefix(prefix, None), *used, i)).max();
        match best {
            Some((held, _, i)) if held > 0 => {
                self.slots[i].1 = self.clock;
                let mut session = self.slots[i].0.fork()?;
                session.truncate(held);
                Ok((session, held))
            }
            _ => Ok((Session::pooled(self.batcher, &self.pool)?, 0)),
        }
    }

    /// Keep a finished request's session: it replaces every kept session whose positions it
    /// holds too, and the least recently used goes when the cache is over its capacity.
    pub fn checkin(&mut self, session: Session<'m>) {
        if self.capacity == 0 || session.is_empty() {
            return;
        }
        self.clock += 1;
        self.slots.retain(|(s, _)| !session.covers(s));
        self.slots.push((session, self.clock));
        while self.slots.len() > self.capacity {
            let oldest = self.slots.iter().enumerate().min_by_key(|(_, (_, used))| *used).map_or(0, |(i, _)| i);
            self.slots.swap_remove(oldest);
        }
    }
}
