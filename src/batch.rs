//! Continuous batching: sessions on many threads share one forward pass per step.
//!
//! [`scope`] starts a thread that owns the model's passes. A session made with
//! [`Session::batched`](crate::session::Session::batched) sends its work there — these tokens on
//! my cache, under my adapter, these logits back — and waits for the answer, so the code that
//! drives it (a tool call, a text answer) stays the sequential code it is on a plain session. The
//! thread gathers the waiting work of every session into one pass ([`Model::forward_each`]): each
//! read of the base weights serves every row, and each row carries its own adapter slot (the fused
//! multi-LoRA kernel), so a selector row of one request, an argument row of another and a text row
//! of a third go through together.
//!
//! A pass holds at most [`Model::step_tokens`] tokens: the shortest work first (decode rows), then
//! prompt pieces with the room left, so a long prompt is computed a piece per pass while the
//! others keep decoding. A token tree (tool scoring) takes a pass of its own when it is the
//! oldest work waiting. Before a pass the
//! thread waits for every [participant](Batcher::join) to have work waiting — at most a quarter
//! of the previous pass's time — so passes stay full while each request spends a moment on the
//! host between tokens (the schema mask).

use crate::error::{Error, Result};
use crate::kernels::matmul::MAX_SLOTS;
use crate::kv::KvCache;
use crate::lora::ActiveAdapter;
use crate::model::{Logits, Model, Sequence};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest and longest wait for participants before a pass.
const GATHER: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// What the batching thread did: passes, and the rows they held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BatchStats {
    /// Forward passes run.
    pub passes: usize,
    /// Sequences over every pass (a pass of 8 requests' decode rows counts 8).
    pub sequences: usize,
    /// Tokens over every pass.
    pub tokens: usize,
    /// Passes whose sequences held more than one request.
    pub shared_passes: usize,
    /// Passes whose rows used more than one adapter (or an adapter and the base weights).
    pub mixed_adapter_passes: usize,
    /// Most sequences in one pass.
    pub widest: usize,
}

/// One session's waiting work: its cache (lent for the pass), the tokens, what to return.
struct Work {
    kv: KvCache,
    tokens: Vec<u32>,
    adapter: Option<ActiveAdapter>,
    /// First row of `tokens` the adapter applies to.
    adapter_from: usize,
    tree: Option<Vec<i32>>,
    want: Logits,
    /// Tokens processed by earlier passes (a prompt computed a piece at a time).
    done: usize,
    reply: SyncSender<(KvCache, Result<Vec<f32>>)>,
}

impl Work {
    fn left(&self) -> usize {
        self.tokens.len() - self.done
    }

    /// Whether it may be computed a piece at a time (only its last logits are wanted).
    fn divisible(&self) -> bool {
        self.tree.is_none() && matches!(self.want, Logits::None | Logits::Last)
    }
}

enum Message {
    Work(Box<Work>),
    /// A participant left: the gathering need not wait for it.
    Left,
}

struct Shared {
    participants: AtomicUsize,
    stats: Mutex<BatchStats>,
}

/// The handle sessions send their work through (see the module documentation).
pub struct Batcher<'m> {
    model: &'m Model,
    queue: Sender<Message>,
    shared: &'m Shared,
}

/// A participant's presence: while it lives, passes wait for its work (see [`Batcher::join`]).
pub struct Participant<'b> {
    batcher: &'b Batcher<'b>,
}

impl Drop for Participant<'_> {
    fn drop(&mut self) {
        self.batcher.shared.participants.fetch_sub(1, Ordering::SeqCst);
        let _ = self.batcher.queue.send(Message::Left);
    }
}

/// Run `f` with a batcher over `model`; its thread ends when `f` returns (every session made
/// from it is gone by then).
pub fn scope<R>(model: &Model, f: impl FnOnce(&Batcher) -> R) -> R {
    let shared = Shared { participants: AtomicUsize::new(0), stats: Mutex::new(BatchStats::default()) };
    let (queue, inbox) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| Executor { model, shared: &shared, pending: Vec::new() }.run(inbox));
        let batcher = Batcher { model, queue, shared: &shared };
        f(&batcher)
    })
}

impl<'m> Batcher<'m> {
    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Count the caller as a participant until the guard is dropped: passes wait (briefly) for
    /// its work. A request holds one while it runs; a session used without one is still served,
    /// only not waited for.
    pub fn join(&self) -> Participant<'_> {
        self.shared.participants.fetch_add(1, Ordering::SeqCst);
        Participant { batcher: self }
    }

    /// What the passes so far held.
    pub fn stats(&self) -> BatchStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Compute `tokens` on `kv` in the next passes and return the cache with the logits `want`
    /// asks for. The cache comes back whatever happens, unless the batching thread is gone.
    pub(crate) fn forward(
        &self,
        kv: KvCache,
        tokens: &[u32],
        adapter: Option<ActiveAdapter>,
        adapter_from: usize,
        tree: Option<&[i32]>,
        want: Logits,
    ) -> (Option<KvCache>, Result<Vec<f32>>) {
        let (reply, answer) = mpsc::sync_channel(1);
        let work = Work { kv, tokens: tokens.to_vec(), adapter, adapter_from, tree: tree.map(<[i32]>::to_vec), want, done: 0, reply };
        let stopped = || Error::Engine("the batching thread has stopped".into());
        if let Err(mpsc::SendError(Message::Work(w))) = self.queue.send(Message::Work(Box::new(work))) {
            return (Some(w.kv), Err(stopped()));
        }
        match answer.recv() {
            Ok((kv, logits)) => (Some(kv), logits),
            Err(_) => (None, Err(stopped())),
        }
    }
}

/// The batching thread's state: the work waiting for a pass.
struct Executor<'m> {
    model: &'m Model,
    shared: &'m Shared,
    pending: Vec<Work>,
}

impl Executor<'_> {
    fn run(mut self, inbox: Receiver<Message>) {
        let mut last_pass = Duration::ZERO;
        loop {
            if self.pending.is_empty() {
                match inbox.recv() {
                    Ok(m) => self.receive(m),
                    Err(_) => return,
                }
                continue;
            }
            let deadline = Instant::now() + (last_pass / 4).clamp(GATHER.0, GATHER.1);
            while self.pending.len() < self.shared.participants.load(Ordering::SeqCst) {
                match inbox.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(m) => self.receive(m),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(m) = inbox.try_recv() {
                self.receive(m);
            }
            let t0 = Instant::now();
            self.pass();
            last_pass = t0.elapsed();
        }
    }

    /// Keep work for a pass, or answer at once work no pass can take (a full cache, a token
    /// outside the vocabulary), so it cannot fail the others' pass.
    fn receive(&mut self, m: Message) {
        let Message::Work(w) = m else { return };
        let mut w = *w;
        let checked = self.model.check_sequence(&Sequence::adapted(&mut w.kv, &w.tokens, w.adapter, w.adapter_from));
        match checked {
            Ok(()) => self.pending.push(w),
            Err(e) => {
                let _ = w.reply.send((w.kv, Err(e)));
            }
        }
    }

    /// Which waiting work goes into the next pass, and how many of its tokens: the shortest
    /// first within the step's token budget and the adapter slots; a piece of a long prompt
    /// with the room left; a tree, or work that cannot be divided and fits nowhere, alone.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut budget = self.model.step_tokens();
        let oldest = &self.pending[0];
        if oldest.tree.is_some() || (oldest.left() > budget && !oldest.divisible()) {
            // A tree, or indivisible work longer than a shared pass: alone, before anything
            // newer (a single sequence may span several passes inside the model).
            return vec![(0, oldest.left())];
        }
        let mut adapters: Vec<ActiveAdapter> = Vec::new();
        let mut order: Vec<usize> = (0..self.pending.len()).collect();
        order.sort_by_key(|&i| self.pending[i].left());
        let mut chosen = Vec::new();
        for i in order {
            let w = &self.pending[i];
            if w.tree.is_some() || budget == 0 {
                continue;
            }
            if let Some(a) = w.adapter.filter(|a| !adapters.contains(a)) {
                if adapters.len() == MAX_SLOTS {
                    continue;
                }
                adapters.push(a);
            }
            let take = match w.left() {
                n if n <= budget => n,
                _ if w.divisible() => budget,
                _ => continue,
            };
            budget -= take;
            chosen.push((i, take));
        }
        chosen
    }

    fn pass(&mut self) {
        let plan = self.plan();
        let mut batch: Vec<(Work, usize)> = Vec::with_capacity(plan.len());
        let mut taken: Vec<Option<Work>> = std::mem::take(&mut self.pending).into_iter().map(Some).collect();
        for &(i, take) in &plan {
            if let Some(w) = taken[i].take() {
                batch.push((w, take));
            }
        }
        self.pending = taken.into_iter().flatten().collect();

        let wants: Vec<Logits> =
            batch.iter().map(|(w, take)| if w.done + take == w.tokens.len() { w.want } else { Logits::None }).collect();
        let tokens: usize = batch.iter().map(|(_, t)| t).sum();
        self.count(&batch, tokens);
        let result = {
            let mut seqs: Vec<Sequence> = batch
                .iter_mut()
                .map(|(w, take)| {
                    let from = w.adapter_from.saturating_sub(w.done);
                    let seq = Sequence::adapted(&mut w.kv, &w.tokens[w.done..w.done + *take], w.adapter, from);
                    match &w.tree {
                        Some(t) => seq.with_tree(t),
                        None => seq,
                    }
                })
                .collect();
            self.model.forward_each(&mut seqs, &wants)
        };
        match result {
            Ok(logits) => {
                for ((mut w, take), logits) in batch.into_iter().zip(logits) {
                    w.done += take;
                    if w.done < w.tokens.len() {
                        self.pending.push(w);
                    } else {
                        let _ = w.reply.send((w.kv, Ok(logits)));
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (w, _) in batch {
                    let _ = w.reply.send((w.kv, Err(Error::Engine(format!("a batched forward pass failed: {message}")))));
                }
            }
        }
    }

    fn count(&self, batch: &[(Work, usize)], tokens: usize) {
        let Ok(mut s) = self.shared.stats.lock() else { return };
        s.passes += 1;
        s.sequences += batch.len();
        s.tokens += tokens;
        s.widest = s.widest.max(batch.len());
        s.shared_passes += (batch.len() > 1) as usize;
        let first = batch.first().map(|(w, _)| w.adapter);
        s.mixed_adapter_passes += batch.iter().any(|(w, _)| Some(w.adapter) != first) as usize;
    }
}
