//! Compute pipelines built from WGSL sources, cached per context, and a recorder that batches
//! many dispatches (each with its own small uniform block) into one submission.

use super::GpuContext;
use crate::error::{Error, Result};
use std::sync::Arc;

/// A WGSL program assembled from shader files plus generated lines (the parameter block, constants).
///
/// Shader files cannot `#include` each other, so launchers list the files a kernel needs
/// (for example `dequant.wgsl` + `quant_matmul.wgsl`) and the values it is specialised on.
pub(crate) struct ShaderSource {
    /// Label and cache key prefix.
    pub name: String,
    /// Generated lines placed first (constants, format selection).
    pub prelude: String,
    /// Shader files, concatenated in order.
    pub files: Vec<&'static str>,
    /// Entry point.
    pub entry: &'static str,
}

/// A compute pipeline and its bind group layout.
pub struct Kernel {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) name: String,
}

impl GpuContext {
    /// The pipeline for `src`, compiled on first use and cached.
    pub(crate) fn kernel(&self, src: &ShaderSource) -> Result<Arc<Kernel>> {
        let key = format!("{}|{}|{}", src.name, src.entry, src.prelude);
        if let Some(k) = self.pipelines.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(k.clone());
        }
        let started = std::time::Instant::now();
        let mut code = src.prelude.clone();
        for f in &src.files {
            code.push('\n');
            code.push_str(f);
        }
        // Validation errors surface through the error scope instead of wgpu's panic handler.
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor { label: Some(&src.name), source: wgpu::ShaderSource::Wgsl(code.into()) };
        // SAFETY: the only check left out is the counter wgpu adds to every loop so that a
        // driver cannot assume a loop ends; it keeps Mesa from unrolling the tiles' loops (the
        // prompt's products ran 1.7× slower with it, docs/performance.md). Dropping it requires
        // that every loop ends. Only this crate's shaders get here (this function and
        // `ShaderSource` are crate-private; `prelude` is generated), and each of their loops
        // counts down, follows parent links that strictly decrease, or counts up by at most 256
        // to a bound no counter can wrap past: a dimension (the loaders accept at most 2^24) or
        // a cache row (below 2^29: a cache is one binding of under 2^32 bytes, 8 or more a row).
        // Bounds checks stay.
        let module = unsafe { self.device.create_shader_module_trusted(desc, trusted_checks()) };
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&src.name),
            layout: None,
            module: &module,
            entry_point: Some(src.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("building kernel '{}' ({}): {e}", src.name, src.entry)));
        }
        let layout = pipeline.get_bind_group_layout(0);
        tracing::debug!(kernel = %src.name, entry = src.entry, ms = started.elapsed().as_millis() as u64, "pipeline built");
        let name = if src.entry == "main" { src.name.clone() } else { format!("{}:{}", src.name, src.entry) };
        let k = Arc::new(Kernel { pipeline, layout, name });
        self.pipelines.lock().map_err(|_| poisoned())?.insert(key, k.clone());
        Ok(k)
    }
}

/// wgpu's shader checks without its loop bounding (see [`GpuContext::kernel`]).
fn trusted_checks() -> wgpu::ShaderRuntimeChecks {
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    checks.force_loop_bounding = false;
    checks
}

fn poisoned() -> Error {
    Error::poisoned("pipeline cache")
}

/// A byte range of a buffer bound to a kernel.
#[derive(Clone)]
pub struct Binding {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) size: Option<u64>,
    pub(crate) slot: Option<u32>,
}

impl Binding {
    /// The whole buffer.
    pub fn whole(buffer: &wgpu::Buffer) -> Self {
        Self { buffer: buffer.clone(), offset: 0, size: None, slot: None }
    }
    /// `size` bytes from `offset`.
    pub fn range(buffer: &wgpu::Buffer, offset: u64, size: u64) -> Self {
        Self { buffer: buffer.clone(), offset, size: Some(size), slot: None }
    }
    /// Bind at WGSL `@binding(slot)` instead of the next number: for an entry point that uses
    /// only some of its file's bindings.
    pub fn at(self, slot: u32) -> Self {
        Self { slot: Some(slot), ..self }
    }
}

struct Dispatch {
    kernel: Arc<Kernel>,
    uniform_offset: u64,
    uniform_size: u64,
    bindings: Vec<Binding>,
    groups: [u32; 3],
    bytes: u64,
}

enum Op {
    Dispatch(Dispatch),
    Copy { src: wgpu::Buffer, src_offset: u64, dst: wgpu::Buffer, dst_offset: u64, size: u64 },
}

/// Records dispatches; `submit` uploads all their uniforms at once and runs them in one submission.
///
/// Every kernel takes its parameters as a uniform block at binding 0 and its buffers at
/// bindings 1.., in the order given to [`Recorder::dispatch`] (or where [`Binding::at`] says).
pub struct Recorder<'a> {
    ctx: &'a GpuContext,
    uniforms: Vec<u8>,
    ops: Vec<Op>,
}

impl<'a> Recorder<'a> {
    /// An empty batch on `ctx`.
    pub fn new(ctx: &'a GpuContext) -> Self {
        Self { ctx, uniforms: Vec::new(), ops: Vec::new() }
    }

    /// Queue one dispatch of `kernel` with `params` as its uniform block.
    pub fn dispatch<P: super::UniformBlock>(
        &mut self,
        kernel: &Arc<Kernel>,
        params: &P,
        bindings: Vec<Binding>,
        groups: [u32; 3],
    ) -> Result<()> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Shape {
                op: "dispatch",
                msg: format!("kernel '{}' needs {groups:?} workgroups, over the device limit {max} per dimension", kernel.name),
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let align = self.ctx.limits.min_uniform_buffer_offset_alignment as usize;
        let offset = self.uniforms.len().div_ceil(align) * align;
        self.uniforms.resize(offset, 0);
        params.write(&mut self.uniforms);
        let size = self.uniforms.len() - offset;
        self.ops.push(Op::Dispatch(Dispatch {
            kernel: kernel.clone(),
            uniform_offset: offset as u64,
            uniform_size: size as u64,
            bindings,
            groups,
            bytes: 0,
        }));
        Ok(())
    }

    /// Declare the bytes the last recorded dispatch must move at least (its weights, inputs and
    /// outputs), for the profile's GB/s column.
    pub fn declare_bytes(&mut self, bytes: u64) {
        if let Some(Op::Dispatch(d)) = self.ops.last_mut() {
            d.bytes = bytes;
        }
    }

    /// Queue a buffer-to-buffer copy, ordered after everything recorded before it.
    pub fn copy(&mut self, src: &wgpu::Buffer, src_offset: u64, dst: &wgpu::Buffer, dst_offset: u64, size: u64) {
        self.ops.push(Op::Copy { src: src.clone(), src_offset, dst: dst.clone(), dst_offset, size });
    }

    /// Number of operations recorded so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Encode everything into one command buffer and submit it.
    ///
    /// The uniform blocks go to the context's persistent uniform buffer and each dispatch's bind
    /// group comes from the context's cache of them (`bind_cache.rs`), so a batch that
    /// repeats the last one (a decode step) builds none. The cache stays locked until the
    /// submission is queued: another thread's uniforms must not overwrite these before they run.
    pub fn submit(self) -> wgpu::SubmissionIndex {
        let dev = &self.ctx.device;
        let mut cache = self.ctx.bind_cache.lock().unwrap_or_else(|p| p.into_inner());
        let ubuf = cache.uniforms(dev, self.uniforms.len() as u64);
        self.ctx.queue.write_buffer(&ubuf, 0, &self.uniforms);
        let groups: Vec<Option<wgpu::BindGroup>> = self
            .ops
            .iter()
            .map(|op| match op {
                Op::Dispatch(d) => Some(cache.group(dev, &ubuf, &d.kernel, d.uniform_offset, d.uniform_size, &d.bindings)),
                Op::Copy { .. } => None,
            })
            .collect();
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("agentflux") });
        let timed: Vec<&Dispatch> = match self.ctx.profile.lock() {
            Ok(p) if p.is_some() => self.ops.iter().filter_map(|op| if let Op::Dispatch(d) = op { Some(d) } else { None }).collect(),
            _ => Vec::new(),
        };
        let stamps = Timestamps::new(self.ctx, timed.len());
        let mut n_timed = 0;
        let mut ops = self.ops.iter().zip(&groups).peekable();
        while let Some((op, group)) = ops.next() {
            match op {
                Op::Copy { src, src_offset, dst, dst_offset, size } => {
                    enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                }
                Op::Dispatch(first) => {
                    // Consecutive dispatches share one compute pass, except when each is timed.
                    let timestamp_writes = stamps.as_ref().map(|s| s.writes(n_timed));
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
                    let mut run = |d: &Dispatch, group: &Option<wgpu::BindGroup>| {
                        pass.set_pipeline(&d.kernel.pipeline);
                        pass.set_bind_group(0, group.as_ref(), &[]);
                        pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                    };
                    run(first, group);
                    if stamps.is_some() {
                        n_timed += 1;
                        continue;
                    }
                    while let Some((Op::Dispatch(d), group)) = ops.peek() {
                        run(d, group);
                        ops.next();
                    }
                }
            }
        }
        let Some(stamps) = stamps else {
            let index = self.ctx.queue.submit([enc.finish()]);
            cache.submitted();
            return index;
        };
        let resolved = stamps.resolve(&mut enc);
        let index = self.ctx.queue.submit([enc.finish()]);
        cache.submitted();
        drop(cache);
        // A profile that cannot be read back is skipped, not fatal: it is a measurement aid.
        match super::buffer::read_bytes(self.ctx, &resolved, 0, resolved.size()) {
            Ok(bytes) => {
                let ticks: &[u64] = bytemuck::cast_slice(&bytes);
                let period = self.ctx.queue.get_timestamp_period() as f64 * 1e-9;
                if let Ok(mut guard) = self.ctx.profile.lock() {
                    if let Some(profile) = guard.as_mut() {
                        for (i, d) in timed.iter().enumerate() {
                            let (t0, t1) = (ticks[2 * i], ticks[2 * i + 1]);
                            profile.add(&d.kernel.name, t1.saturating_sub(t0) as f64 * period, d.bytes);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("reading the kernel timestamps back: {e}"),
        }
        index
    }
}

/// Query sets holding a start and an end timestamp per timed dispatch.
struct Timestamps {
    sets: Vec<wgpu::QuerySet>,
    buffer: wgpu::Buffer,
    count: u32,
}

impl Timestamps {
    /// Room for `n` dispatches, or `None` when there is nothing to time.
    fn new(ctx: &GpuContext, n: usize) -> Option<Self> {
        if n == 0 {
            return None;
        }
        let count = 2 * n as u32;
        let per_set = wgpu::QUERY_SET_MAX_QUERIES;
        let sets = (0..count.div_ceil(per_set))
            .map(|i| {
                ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: (count - i * per_set).min(per_set),
                })
            })
            .collect();
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kernel timestamps"),
            size: count as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Self { sets, buffer, count })
    }

    /// Where dispatch `i` writes its start and end.
    fn writes(&self, i: usize) -> wgpu::ComputePassTimestampWrites<'_> {
        let q = 2 * i as u32;
        let per_set = wgpu::QUERY_SET_MAX_QUERIES;
        wgpu::ComputePassTimestampWrites {
            query_set: &self.sets[(q / per_set) as usize],
            beginning_of_pass_write_index: Some(q % per_set),
            end_of_pass_write_index: Some(q % per_set + 1),
        }
    }

    /// Record the copy of every timestamp into one buffer (start, end per dispatch, in order).
    fn resolve(self, enc: &mut wgpu::CommandEncoder) -> wgpu::Buffer {
        let per_set = wgpu::QUERY_SET_MAX_QUERIES;
        for (i, set) in self.sets.iter().enumerate() {
            let first = i as u32 * per_set;
            let n = (self.count - first).min(per_set);
            enc.resolve_query_set(set, 0..n, &self.buffer, first as u64 * 8);
        }
        self.buffer
    }
}
