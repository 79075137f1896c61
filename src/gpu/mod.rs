//! The GPU layer: device and limits, buffers, pipelines, and batched dispatch.

mod bind_cache;
mod blocks;
mod buffer;
mod context;
mod kernel;
mod memory;
mod profile;
mod uniform;
mod view;

pub use blocks::uploaded_bytes;
pub use buffer::{read_f32, read_u32, storage_buffer, storage_buffer_zeroed, upload, WeightMatrix, WeightPart};
pub use context::{describe_adapter, list_adapters, DeviceClass, GpuContext, GpuFeatures, GpuOptions, Products};
pub(crate) use kernel::ShaderSource;
pub use kernel::{Binding, Kernel, Recorder};
pub use memory::MemoryUse;
pub use profile::{profile_table, KernelTime};
pub(crate) use uniform::uniform_block;
pub use uniform::{align_to, UniformBlock, UniformField};
pub use view::View;
