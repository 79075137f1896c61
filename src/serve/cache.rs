//! The server's prefix cache: the KV caches of earlier requests, kept under a memory budget.
//!
//! An agent framework sends the whole conversation on every step, so consecutive requests share
//! their beginning (system text, tool list, earlier turns). The worker keeps up to `capacity`
//! sessions; a request continues the one whose cache holds the longest prefix of its prompt
//! computed with the base weights (which every adapter may reuse: activated LoRA), so only what
//! is new is computed. Positions made under an adapter are reused by that adapter only
//! ([`Session`] tracks who made each). When every session is taken, the least recently used is
//! emptied for the new conversation. llama.cpp's server keeps one such cache per slot and picks
//! the slot by prefix similarity in the same way.

use crate::error::Result;
use crate::model::Model;
use crate::session::Session;

/// Sessions kept across requests, each with the time it was last used.
pub(super) struct PrefixCache<'m> {
    model: &'m Model,
    n_ctx: usize,
    capacity: usize,
    slots: Vec<(Session<'m>, u64)>,
    clock: u64,
}

impl<'m> PrefixCache<'m> {
    /// Room for `capacity` sessions of `n_ctx` positions, made as they are needed; with 0, one
    /// session that every request empties first (no cache).
    pub fn new(model: &'m Model, n_ctx: usize, capacity: usize) -> Self {
        Self { model, n_ctx, capacity, slots: Vec::new(), clock: 0 }
    }

    /// The session for a request whose prompt begins with `prefix` (computed with the base
    /// weights), and how many of those tokens it already holds.
    pub fn checkout(&mut self, prefix: &[u32]) -> Result<(&mut Session<'m>, usize)> {
        self.clock += 1;
        if self.capacity == 0 {
            if self.slots.is_empty() {
                self.slots.push((Session::new(self.model, self.n_ctx)?, 0));
            }
            self.slots[0].0.truncate(0);
            return Ok((&mut self.slots[0].0, 0));
        }
        // The session holding the longest prefix, the most recently used among equals.
        let best = self.slots.iter().enumerate().map(|(i, (s, used))| (s.cached_prefix(prefix, None), *used, i)).max();
        let i = match best {
            Some((held, _, i)) if held > 0 => i,
            _ if self.slots.len() < self.capacity => {
                self.slots.push((Session::new(self.model, self.n_ctx)?, 0));
                self.slots.len() - 1
            }
            _ => self.least_recent(),
        };
        let slot = &mut self.slots[i];
        slot.1 = self.clock;
        let held = slot.0.cached_prefix(prefix, None);
        Ok((&mut slot.0, held))
    }

    fn least_recent(&self) -> usize {
        self.slots.iter().enumerate().min_by_key(|(_, (_, used))| *used).map_or(0, |(i, _)| i)
    }
}
