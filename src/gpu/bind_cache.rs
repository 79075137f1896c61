//! Bind groups kept from one submission to the next.
//!
//! A decode step records the same dispatches over the same buffers every token; only the values
//! in their uniform blocks change. The uniform blocks therefore live in one persistent buffer, at
//! offsets fixed by the order of recording, so a dispatch's bind group (kernel, uniform range,
//! buffer ranges) repeats exactly and is built once instead of once per token.
//!
//! A cached bind group holds its buffers alive, so entries that the last [`KEEP`] submissions did
//! not use are dropped after each submission; a buffer dropped by its owner is freed at most that
//! many submissions later, or at [`BindCache::clear`].

use std::collections::HashMap;
use std::sync::Arc;

use super::kernel::{Binding, Kernel};

/// Submissions an unused bind group survives.
const KEEP: u64 = 2;

/// What makes two dispatches' bind groups interchangeable.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    /// The kernel's address (kernels live as long as their context's pipeline cache).
    kernel: usize,
    uniform_offset: u64,
    uniform_size: u64,
    buffers: Vec<(u32, wgpu::Buffer, u64, Option<u64>)>,
}

struct Entry {
    group: wgpu::BindGroup,
    last_used: u64,
}

/// The persistent uniform buffer and the bind groups built over it.
#[derive(Default)]
pub(crate) struct BindCache {
    uniforms: Option<wgpu::Buffer>,
    groups: HashMap<Key, Entry>,
    submission: u64,
    /// Bind groups built, and reused from the cache, since the context was made.
    pub(crate) built: u64,
    pub(crate) reused: u64,
}

impl BindCache {
    /// The uniform buffer, grown (and the cache emptied, its groups naming the old buffer) when
    /// `bytes` do not fit.
    pub(crate) fn uniforms(&mut self, device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(256);
        match &self.uniforms {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                self.groups.clear();
                let b = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("uniforms"),
                    size: bytes.next_power_of_two(),
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                self.uniforms = Some(b.clone());
                b
            }
        }
    }

    /// The bind group of a dispatch of `kernel` whose uniform block is at `uniform_offset`
    /// (`uniform_size` bytes) of `uniforms` (the buffer [`BindCache::uniforms`] returned last),
    /// built on first use.
    pub(crate) fn group(
        &mut self,
        device: &wgpu::Device,
        uniforms: &wgpu::Buffer,
        kernel: &Arc<Kernel>,
        uniform_offset: u64,
        uniform_size: u64,
        bindings: &[Binding],
    ) -> wgpu::BindGroup {
        let slots = bindings.iter().enumerate().map(|(i, b)| (b.slot.unwrap_or(i as u32 + 1), b));
        let key = Key {
            kernel: Arc::as_ptr(kernel) as usize,
            uniform_offset,
            uniform_size,
            buffers: slots.clone().map(|(s, b)| (s, b.buffer.clone(), b.offset, b.size)).collect(),
        };
        let now = self.submission;
        if let Some(e) = self.groups.get_mut(&key) {
            e.last_used = now;
            self.reused += 1;
            return e.group.clone();
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: uniforms,
                offset: uniform_offset,
                size: wgpu::BufferSize::new(uniform_size),
            }),
        }];
        entries.extend(slots.map(|(slot, b)| wgpu::BindGroupEntry {
            binding: slot,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &b.buffer,
                offset: b.offset,
                size: b.size.and_then(wgpu::BufferSize::new),
            }),
        }));
        let group =
            device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&kernel.name), layout: &kernel.layout, entries: &entries });
        self.built += 1;
        self.groups.insert(key, Entry { group: group.clone(), last_used: now });
        group
    }

    /// End of a submission: forget the groups the last [`KEEP`] submissions did not use.
    pub(crate) fn submitted(&mut self) {
        let now = self.submission;
        self.groups.retain(|_, e| e.last_used + KEEP > now);
        self.submission += 1;
    }

    /// Drop every cached group (and with them the last references to buffers their owners dropped).
    pub(crate) fn clear(&mut self) {
        self.groups.clear();
    }
}
