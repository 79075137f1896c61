//! Device selection, feature detection and limits.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What kind of device the kernels are tuned for; picks kernel variants at pipeline creation.
/// Detected from the adapter's type; `$AGENTFLUX_KERNELS` (`gpu` or `cpu`) or
/// [`GpuOptions::kernels`] choose either family on any device, to benchmark or test it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DeviceClass {
    /// A discrete or integrated GPU: workgroup-cooperative kernels.
    Gpu,
    /// A CPU-backed device (Mesa llvmpipe, SwiftShader, WARP): long per-invocation loops.
    Cpu,
}

/// How the quantized products take their activations: as f32, with every weight decoded to
/// f32, or quantized to 8 bits once per product and multiplied as packed integers (llama.cpp's
/// way on CPUs and its Vulkan backend's "integer dot" path). `$AGENTFLUX_PRODUCTS` (`float` or
/// `int8`) or [`GpuOptions::products`] choose; the default is f32 on both kernel families
/// (docs/performance.md: on the CPU-backed family 8-bit is faster for a single row and slower
/// for several, and the choice cannot follow the rows of a pass without letting a request's
/// company change its answer; the GPU family is not measured yet). Training's traced forward
/// always takes f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum Products {
    /// f32 activations.
    #[default]
    Float,
    /// 8-bit activations with a scale per 32 values, packed 4×8-bit dot products.
    Int8,
}

impl Products {
    /// `float` or `int8`, case-insensitive.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "float" | "f32" => Ok(Self::Float),
            "int8" | "i8" => Ok(Self::Int8),
            _ => Err(Error::InvalidOption(format!("product kind '{s}': expected float or int8"))),
        }
    }
}

/// How to choose and configure the device.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Pick the device whose name contains this (case-insensitive), or whose index in
    /// `agentflux info --gpus`'s list equals it. Default: `$AGENTFLUX_GPU` (formerly
    /// `$AGENTFLUX_ADAPTER`), else a high-performance one.
    pub gpu: Option<String>,
    /// Pretend storage bindings can hold at most this many bytes (tests of tensor splitting).
    pub max_binding_bytes: Option<u64>,
    /// The kernel family to use. Default: `$AGENTFLUX_KERNELS` (`gpu`/`cpu`), else the family
    /// that suits the adapter's type.
    pub kernels: Option<DeviceClass>,
    /// Leave subgroup operations off even where the device has them (their fallbacks run).
    pub no_subgroups: bool,
    /// How quantized products take their activations. Default: `$AGENTFLUX_PRODUCTS`
    /// (`float`/`int8`), else f32.
    pub products: Option<Products>,
}

impl DeviceClass {
    /// `gpu` or `cpu`, case-insensitive.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            _ => Err(Error::InvalidOption(format!("kernel family '{s}': expected gpu or cpu"))),
        }
    }
}

/// Optional device features the kernels can use.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GpuFeatures {
    /// `shader-f16` is available.
    pub shader_f16: bool,
    /// Subgroup operations are available.
    pub subgroups: bool,
    /// Timestamp queries are available.
    pub timestamps: bool,
}

/// The device, its queue, and the pipelines built on it.
pub struct GpuContext {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter's description (name, backend, driver).
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with (the adapter's own).
    pub limits: wgpu::Limits,
    /// Optional features present.
    pub features: GpuFeatures,
    /// CPU-backed or a real GPU.
    pub class: DeviceClass,
    /// f32 or 8-bit activations in the quantized products.
    pub products: Products,
    max_binding: u64,
    placeholder: wgpu::Buffer,
    pub(crate) pipelines: Mutex<HashMap<String, Arc<super::kernel::Kernel>>>,
    /// The uniform buffer and the bind groups recent submissions used.
    pub(crate) bind_cache: Mutex<super::bind_cache::BindCache>,
    /// Per-kernel timings while profiling is on.
    pub(crate) profile: Mutex<Option<super::profile::Profile>>,
}

impl Drop for GpuContext {
    /// With `AGENTFLUX_PROFILE` set, the whole run's per-kernel table goes to stderr.
    fn drop(&mut self) {
        let kernels = self.stop_profiling();
        if !kernels.is_empty() {
            let total: f64 = kernels.iter().map(|k| k.seconds).sum();
            eprintln!(
                "\nGPU time by kernel on {} ({total:.2} s in all; each dispatch timed alone):\n\n{}",
                self.info.name,
                super::profile_table(&kernels, 1, "run")
            );
        }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({})", self.describe())
    }
}

/// Names and types of every adapter wgpu finds.
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all())).iter().map(|a| a.get_info()).collect()
}

/// One line naming a device and its driver: `NAME (BACKEND, TYPE, driver DRIVER)`, without the
/// driver where the backend reports none. The driver's version belongs with any figure measured
/// on the device: lavapipe from Mesa 26 runs this engine 1.15–1.3× faster than from Mesa 25.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let driver = match info.driver_info.trim() {
        "" => String::new(),
        d => format!(", driver {d}"),
    };
    format!("{} ({:?}, {:?}{driver})", info.name, info.backend, info.device_type)
}

impl GpuContext {
    /// Open a device as `opts` says.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let choice = opts.gpu.clone().or_else(|| env("AGENTFLUX_GPU")).or_else(|| env("AGENTFLUX_ADAPTER"));
        let adapter = match choice {
            Some(want) => {
                let lower = want.to_lowercase();
                let found = adapters
                    .into_iter()
                    .enumerate()
                    .find(|(i, a)| want.parse::<usize>().ok() == Some(*i) || a.get_info().name.to_lowercase().contains(&lower));
                found
                    .map(|(_, a)| a)
                    .ok_or_else(|| Error::Gpu(format!("no device matches '{want}' (see `agentflux info --gpus` for the list)")))?
            }
            None => {
                // Prefer a real GPU, then anything with compute.
                let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
                    wgpu::DeviceType::DiscreteGpu => 0,
                    wgpu::DeviceType::IntegratedGpu => 1,
                    wgpu::DeviceType::VirtualGpu | wgpu::DeviceType::Other => 2,
                    wgpu::DeviceType::Cpu => 3,
                };
                let mut v = adapters;
                v.sort_by_key(rank);
                v.into_iter().next().ok_or_else(|| {
                    Error::Gpu(
                        "no GPU adapter found. Without a GPU install Mesa's software Vulkan driver: \
                         `apt-get install -y mesa-vulkan-drivers libvulkan1`"
                            .into(),
                    )
                })?
            }
        };
        let info = adapter.get_info();
        let available = adapter.features();
        let mut wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        if opts.no_subgroups {
            wanted.remove(wgpu::Features::SUBGROUP);
        }
        let features = available & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("agentflux"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::Gpu(format!("requesting a device from '{}': {e}", info.name)))?;
        let class = match opts.kernels {
            Some(c) => c,
            None => match std::env::var("AGENTFLUX_KERNELS") {
                Ok(v) if !v.is_empty() => DeviceClass::parse(&v).map_err(|e| Error::InvalidOption(format!("AGENTFLUX_KERNELS: {e}")))?,
                _ if info.device_type == wgpu::DeviceType::Cpu => DeviceClass::Cpu,
                _ => DeviceClass::Gpu,
            },
        };
        let products = match opts.products {
            Some(p) => p,
            None => match std::env::var("AGENTFLUX_PRODUCTS") {
                Ok(v) if !v.is_empty() => Products::parse(&v).map_err(|e| Error::InvalidOption(format!("AGENTFLUX_PRODUCTS: {e}")))?,
                _ => Products::default(),
            },
        };
        let hw_binding = (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let max_binding = opts.max_binding_bytes.map_or(hw_binding, |m| m.min(hw_binding));
        tracing::info!(adapter = %info.name, backend = ?info.backend, ?class, ?products, max_binding, "GPU ready");
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("placeholder"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            placeholder,
            device,
            queue,
            info,
            limits,
            features: GpuFeatures {
                shader_f16: features.contains(wgpu::Features::SHADER_F16),
                subgroups: features.contains(wgpu::Features::SUBGROUP),
                timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            },
            class,
            products,
            max_binding,
            pipelines: Mutex::new(HashMap::new()),
            bind_cache: Mutex::new(Default::default()),
            profile: Mutex::new(None),
        })
        .inspect(|ctx| {
            if std::env::var("AGENTFLUX_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0") {
                if let Err(e) = ctx.start_profiling() {
                    tracing::warn!("AGENTFLUX_PROFILE: {e}");
                }
            }
        })
    }

    /// Start timing every dispatch per kernel (timestamp queries), clearing earlier totals.
    /// Fails where the device has no timestamp queries.
    pub fn start_profiling(&self) -> Result<()> {
        if !self.features.timestamps {
            return Err(Error::Gpu(format!("'{}' has no timestamp queries: per-kernel times are not available", self.info.name)));
        }
        *self.profile.lock().map_err(|_| Error::poisoned("profile"))? = Some(Default::default());
        Ok(())
    }

    /// Stop profiling; the totals per kernel, the most expensive first (empty if it was not on).
    pub fn stop_profiling(&self) -> Vec<super::KernelTime> {
        let taken = self.profile.lock().map(|mut p| p.take()).unwrap_or(None);
        taken.map(|p| p.sorted()).unwrap_or_default()
    }

    /// Whether `lanes` neighbouring invocations always share a subgroup, so subgroup operations
    /// can combine them (the device has subgroups and none is smaller than `lanes`).
    pub fn subgroups_hold(&self, lanes: u32) -> bool {
        self.features.subgroups && self.info.subgroup_min_size >= lanes
    }

    /// How many invocations the device runs side by side (its largest subgroup; 8 where the
    /// adapter does not say): on a CPU-backed device, the lanes of one vector, which a kernel's
    /// grid should fill.
    pub fn simd_lanes(&self) -> usize {
        match self.info.subgroup_max_size {
            0 => 8,
            n => n as usize,
        }
    }

    /// Bind groups built, and reused from earlier submissions, since the context was made: a
    /// decode step that reuses all of its groups builds none.
    pub fn bind_group_counts(&self) -> (u64, u64) {
        let cache = self.bind_cache.lock().unwrap_or_else(|p| p.into_inner());
        (cache.built, cache.reused)
    }

    /// Drop the bind groups kept for reuse, which hold the buffers they bind alive (otherwise a
    /// buffer its owner dropped is freed two submissions later).
    pub fn release_bind_groups(&self) {
        self.bind_cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The largest storage binding, in bytes, this context will create (tensors beyond it are split).
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// A small buffer bound where a kernel's optional input is switched off (a binding must
    /// always be bound, even if the kernel never reads it).
    pub fn placeholder(&self) -> &wgpu::Buffer {
        &self.placeholder
    }

    /// One line naming the device and its driver ([`describe_adapter`]).
    pub fn describe(&self) -> String {
        describe_adapter(&self.info)
    }
}
