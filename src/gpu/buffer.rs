//! Storage buffers, readback, and weight matrices split across binding-size limits.

use super::{blocks, GpuContext};
use crate::error::{Error, Result};
use crate::gguf::BlockFormat;

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::COPY_SRC);

/// A storage buffer holding `bytes` (padded to 4 bytes, the granularity shaders read).
pub fn storage_buffer(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    // create_buffer_init pads to the copy alignment (4 bytes), which shaders reading u32 words rely on.
    let contents: &[u8] = if bytes.is_empty() { &[0u8; 4] } else { bytes };
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage: STORAGE })
}

/// A zero-filled storage buffer of `size` bytes.
pub fn storage_buffer_zeroed(ctx: &GpuContext, label: &str, size: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (size.div_ceil(4) * 4).max(4),
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// Write `data` into `buf` at byte `offset` (queued before the next submission).
pub fn upload<T: bytemuck::Pod>(ctx: &GpuContext, buf: &wgpu::Buffer, offset: u64, data: &[T]) {
    ctx.queue.write_buffer(buf, offset, bytemuck::cast_slice(data));
}

pub(crate) fn read_bytes(ctx: &GpuContext, buf: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, offset, &staging, 0, size);
    ctx.queue.submit([enc.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
    rx.recv()
        .map_err(|_| Error::Gpu("readback callback never ran".into()))?
        .map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
    let view = staging.get_mapped_range(..).map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?;
    Ok(view.to_vec())
}

/// Read `n` f32 values from `buf` starting at element `start`.
pub fn read_f32(ctx: &GpuContext, buf: &wgpu::Buffer, start: usize, n: usize) -> Result<Vec<f32>> {
    let b = read_bytes(ctx, buf, start as u64 * 4, n as u64 * 4)?;
    Ok(bytemuck::pod_collect_to_vec(&b))
}

/// Read `n` u32 values from `buf` starting at element `start`.
pub fn read_u32(ctx: &GpuContext, buf: &wgpu::Buffer, start: usize, n: usize) -> Result<Vec<u32>> {
    let b = read_bytes(ctx, buf, start as u64 * 4, n as u64 * 4)?;
    Ok(bytemuck::pod_collect_to_vec(&b))
}

/// A weight matrix `rows × cols` in a GGUF block format, resident on the GPU.
///
/// Rows are stored as in GGUF (row-major blocks). A matrix larger than the device's largest
/// storage binding is split by rows into several parts; kernels run once per part. Several matrices
/// may share one buffer ([`WeightMatrix::upload_group`]) so that one kernel reads them together.
pub struct WeightMatrix {
    /// Output rows (`N` of `y = W x`).
    pub rows: usize,
    /// Input columns (`K`).
    pub cols: usize,
    /// Block format of the stored rows.
    pub format: BlockFormat,
    /// The parts, in row order.
    pub parts: Vec<WeightPart>,
}

/// Rows `row0 .. row0 + rows` of a weight matrix, stored at byte `offset` of `buf`.
#[derive(Clone)]
pub struct WeightPart {
    /// First row.
    pub row0: usize,
    /// Rows in this part.
    pub rows: usize,
    /// The buffer holding them.
    pub buf: wgpu::Buffer,
    /// Byte offset of the first row in `buf` (a multiple of the device's storage offset alignment).
    pub offset: u64,
    /// Bytes of the rows, padded to 4.
    pub bytes: u64,
}

impl WeightPart {
    /// The part's rows as a kernel binding.
    pub fn binding(&self) -> super::Binding {
        super::Binding::range(&self.buf, self.offset, self.bytes)
    }
}

/// Checks that `bytes` hold `rows` GGUF rows of `cols` values; returns the bytes of a row as
/// uploaded ([`blocks`]).
fn check_matrix(name: &str, format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<usize> {
    if cols % format.block_len() != 0 || cols % 32 != 0 {
        return Err(Error::Shape {
            op: "WeightMatrix::upload",
            msg: format!("{name}: {cols} columns is not a multiple of 32 and of the {format:?} block ({})", format.block_len()),
        });
    }
    let row_bytes = format.row_bytes(cols);
    if bytes.len() != rows * row_bytes {
        return Err(Error::Shape {
            op: "WeightMatrix::upload",
            msg: format!("{name}: {} bytes given for {rows}×{cols} {format:?} ({} expected)", bytes.len(), rows * row_bytes),
        });
    }
    Ok(blocks::row_bytes(format, cols))
}

impl WeightMatrix {
    /// Upload `bytes` (`rows` rows of `cols` values in `format`), split to fit the binding limit.
    pub fn upload(ctx: &GpuContext, name: &str, format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let row_bytes = check_matrix(name, format, rows, cols, bytes)?;
        let bytes = blocks::padded(format, bytes);
        let rows_per_part = (ctx.max_binding() as usize / row_bytes).max(1);
        if rows_per_part * row_bytes > ctx.max_binding() as usize {
            return Err(Error::Shape {
                op: "WeightMatrix::upload",
                msg: format!("{name}: one row ({row_bytes} bytes) exceeds the binding limit of {} bytes", ctx.max_binding()),
            });
        }
        let mut parts = Vec::new();
        let mut r = 0;
        while r < rows {
            let n = rows_per_part.min(rows - r);
            let buf = storage_buffer(ctx, name, &bytes[r * row_bytes..(r + n) * row_bytes]);
            parts.push(WeightPart { row0: r, rows: n, buf, offset: 0, bytes: (n * row_bytes).div_ceil(4) as u64 * 4 });
            r += n;
        }
        Ok(Self { rows, cols, format, parts })
    }

    /// `N` matrices of one format and width (`rows[i]` rows of `cols` values each) in one
    /// buffer, each at the next offset a binding may start at, so one kernel can read several
    /// (a feed-forward block's gate and up projections; an attention block's query, key and value
    /// projections, which [`WeightMatrix::stacked`] then reads as one matrix) while each stays
    /// usable alone. Where the formats differ or the group would not fit one binding, each gets
    /// its own buffers.
    pub fn upload_group<const N: usize>(
        ctx: &GpuContext,
        names: [&str; N],
        formats: [BlockFormat; N],
        rows: [usize; N],
        cols: usize,
        bytes: [&[u8]; N],
    ) -> Result<[Self; N]> {
        let mut row_bytes = [0usize; N];
        for i in 0..N {
            row_bytes[i] = check_matrix(names[i], formats[i], rows[i], cols, bytes[i])?;
        }
        let align = (ctx.limits.min_storage_buffer_offset_alignment as usize).max(4);
        let mut offsets = [0usize; N];
        let mut end = 0usize;
        for i in 0..N {
            offsets[i] = end.div_ceil(align) * align;
            end = offsets[i] + rows[i] * row_bytes[i];
        }
        if formats.iter().any(|&f| f != formats[0]) || end as u64 > ctx.max_binding() {
            let mut out = Vec::with_capacity(N);
            for i in 0..N {
                out.push(Self::upload(ctx, names[i], formats[i], rows[i], cols, bytes[i])?);
            }
            return out.try_into().map_err(|_| Error::Shape { op: "WeightMatrix::upload_group", msg: "group size".into() });
        }
        let mut all = vec![0u8; end];
        for i in 0..N {
            all[offsets[i]..offsets[i] + rows[i] * row_bytes[i]].copy_from_slice(&blocks::padded(formats[i], bytes[i]));
        }
        let buf = storage_buffer(ctx, &names.join(" + "), &all);
        Ok(std::array::from_fn(|i| Self {
            rows: rows[i],
            cols,
            format: formats[i],
            parts: vec![WeightPart {
                row0: 0,
                rows: rows[i],
                buf: buf.clone(),
                offset: offsets[i] as u64,
                bytes: (rows[i] * row_bytes[i]).div_ceil(4) as u64 * 4,
            }],
        }))
    }

    /// The matrices `ms` read as one whose rows are theirs in order, when they lie back to back
    /// in one buffer ([`WeightMatrix::upload_group`] places them so where each one's bytes end
    /// at a binding offset): one product then computes all of them.
    pub fn stacked(ms: &[&WeightMatrix]) -> Option<WeightMatrix> {
        let first = ms.first()?;
        let [head] = &first.parts[..] else { return None };
        let row_bytes = first.row_bytes();
        let mut rows = 0;
        for m in ms {
            let [p] = &m.parts[..] else { return None };
            let next = head.offset + (rows * row_bytes) as u64;
            if p.buf != head.buf || p.offset != next || m.format != first.format || m.cols != first.cols {
                return None;
            }
            rows += m.rows;
        }
        let part =
            WeightPart { row0: 0, rows, buf: head.buf.clone(), offset: head.offset, bytes: (rows * row_bytes).div_ceil(4) as u64 * 4 };
        Some(WeightMatrix { rows, cols: first.cols, format: first.format, parts: vec![part] })
    }

    /// Where `other`'s rows start, in bytes from this matrix's first row, when both are whole
    /// (one part each) in one buffer with the same format and width: one kernel can then read
    /// both through a binding of this matrix's buffer.
    pub fn pair_offset(&self, other: &WeightMatrix) -> Option<u64> {
        let ([a], [b]) = (&self.parts[..], &other.parts[..]) else { return None };
        (a.buf == b.buf && b.offset >= a.offset && self.format == other.format && self.cols == other.cols).then(|| b.offset - a.offset)
    }

    /// Bytes of one row as uploaded: GGUF's, or with blocks GGUF leaves 2-byte aligned padded to
    /// whole words ([`uploaded_bytes`](crate::gpu::uploaded_bytes)).
    pub fn row_bytes(&self) -> usize {
        blocks::row_bytes(self.format, self.cols)
    }

    /// Bytes of weights (what one full matrix-vector product must read).
    pub fn n_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }
}
