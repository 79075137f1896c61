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
//!
//! Requests that arrive together with nothing cached (an agent framework's first steps, each
//! with the same system text and tool list) would each compute the shared part. [`SharedCache`]
//! lets the first compute it: a request whose uncomputed prefix is long registers it while it
//! computes it; a request that would share at least [`SHARE_MIN`] more tokens with it than the
//! cache holds waits until those tokens are computed, then starts from a copy of them.

use crate::batch::Batcher;
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::session::Session;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tokens a request must stand to gain before it waits for another to compute them.
pub(super) const SHARE_MIN: usize = 64;
/// The longest a request waits for another's prefix.
const SHARE_WAIT: Duration = Duration::from_secs(30);

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

    /// Tokens of `prefix` the best kept session holds.
    fn held(&self, prefix: &[u32]) -> usize {
        self.slots.iter().map(|(s, _)| s.cached_prefix(prefix, None)).max().unwrap_or(0)
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

/// A prefix being computed by a running request, and how many requests wait for it.
struct InFlight {
    ticket: u64,
    prefix: Vec<u32>,
    waiters: usize,
}

/// The prefix cache as the request threads share it, with the prefixes being computed.
pub(super) struct SharedCache<'m> {
    state: Mutex<(PrefixCache<'m>, Vec<InFlight>, u64)>,
    computed: Condvar,
}

/// A request that computes its prefix for others: [`SharedCache::publish`] it once computed.
pub(super) struct Ticket(u64);

impl<'m> SharedCache<'m> {
    pub fn new(cache: PrefixCache<'m>) -> Self {
        Self { state: Mutex::new((cache, Vec::new(), 0)), computed: Condvar::new() }
    }

    fn lock(&self) -> Result<MutexGuard<'_, (PrefixCache<'m>, Vec<InFlight>, u64)>> {
        self.state.lock().map_err(|_| Error::poisoned("prefix cache"))
    }

    /// A session for a request whose prompt begins with `prefix`, how many of its tokens it
    /// holds, and — when at least [`SHARE_MIN`] are left to compute — a ticket: compute them
    /// first and publish them. Waits (up to 30 s) while a running request computes a prefix
    /// that would give this one [`SHARE_MIN`] more tokens than the cache holds.
    pub fn checkout(&self, prefix: &[u32]) -> Result<(Session<'m>, usize, Option<Ticket>)> {
        let deadline = Instant::now() + SHARE_WAIT;
        let mut guard = self.lock()?;
        loop {
            let (cache, inflight, _) = &mut *guard;
            let held = cache.held(prefix);
            let common = |f: &InFlight| f.prefix.iter().zip(prefix).take_while(|(a, b)| a == b).count();
            let left = deadline.saturating_duration_since(Instant::now());
            match inflight.iter_mut().filter(|f| common(f) >= held + SHARE_MIN).max_by_key(|f| common(f)) {
                Some(f) if !left.is_zero() => {
                    f.waiters += 1;
                    let ticket = f.ticket;
                    guard = self.computed.wait_timeout(guard, left).map_err(|_| Error::poisoned("prefix cache"))?.0;
                    if let Some(f) = guard.1.iter_mut().find(|f| f.ticket == ticket) {
                        f.waiters -= 1;
                    }
                }
                _ => break,
            }
        }
        let (cache, inflight, next) = &mut *guard;
        let (session, held) = cache.checkout(prefix)?;
        let ticket = (prefix.len().saturating_sub(held) > SHARE_MIN).then(|| {
            *next += 1;
            inflight.push(InFlight { ticket: *next, prefix: prefix.to_vec(), waiters: 0 });
            Ticket(*next)
        });
        Ok((session, held, ticket))
    }

    /// `session` now holds the prefix `ticket` was for: requests waiting for it start from a
    /// copy (kept in the cache), and new ones no longer wait.
    pub fn publish(&self, ticket: &Ticket, session: &Session<'m>) -> Result<()> {
        let mut guard = self.lock()?;
        let (cache, inflight, _) = &mut *guard;
        let Some(at) = inflight.iter().position(|f| f.ticket == ticket.0) else { return Ok(()) };
        let f = inflight.swap_remove(at);
        if f.waiters > 0 {
            cache.checkin(session.fork()?);
        }
        drop(guard);
        self.computed.notify_all();
        Ok(())
    }

    /// Keep a finished request's session (see [`PrefixCache::checkin`]); its ticket, if it never
    /// published, is withdrawn and its waiters go on.
    pub fn checkin(&self, ticket: Option<Ticket>, session: Session<'m>) {
        if let Ok(mut guard) = self.lock() {
            if let Some(t) = ticket {
                guard.1.retain(|f| f.ticket != t.0);
            }
            guard.0.checkin(session);
        }
        self.computed.notify_all();
    }
}
