//! Parsing of the GGUF header, metadata and tensor index over a memory map.

use super::{BlockFormat, GgmlType, GgufError, GgufErrorKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // GGUF's value types, one variant each
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F32(_) => "f32",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }

    /// Any integer type as u64 (negative values are refused).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Self::I8(v) => Some(v as f64),
                Self::I16(v) => Some(v as f64),
                Self::I32(v) => Some(v as f64),
                Self::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous one (columns of a matrix).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the first byte from the start of the file.
    pub file_offset: u64,
    /// Size in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// (rows, cols) of the tensor seen as a matrix: cols = `dims[0]`, rows = the product of the rest.
    pub fn matrix_shape(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = self.dims.iter().skip(1).product::<u64>() as usize;
        (rows, cols)
    }

    /// The block format, or the error that says this type is not supported.
    pub fn format(&self) -> Result<BlockFormat, GgufErrorKind> {
        self.ty.format().ok_or_else(|| GgufErrorKind::UnsupportedType { tensor: self.name.clone(), ty: self.ty })
    }
}

/// A parsed GGUF file over a read-only memory map.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufErrorKind> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(GgufErrorKind::Truncated { what: what(), offset: self.pos as u64, file_len: self.buf.len() as u64 });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufErrorKind> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufErrorKind> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn count(&mut self, what: &dyn Fn() -> String) -> Result<usize, GgufErrorKind> {
        let n = self.u64(what)?;
        // No count can exceed the bytes left: this refuses absurd lengths before allocating.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufErrorKind::Malformed {
                what: what(),
                detail: format!("length {n} exceeds the {} bytes left in the file", self.buf.len() - self.pos),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufErrorKind> {
        let n = self.count(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|e| GgufErrorKind::Malformed { what: what(), detail: format!("invalid UTF-8: {e}") })
    }
    fn value(&mut self, type_id: u32, what: &dyn Fn() -> String, depth: u32) -> Result<MetaValue, GgufErrorKind> {
        Ok(match type_id {
            0 => MetaValue::U8(self.take(1, what)?[0]),
            1 => MetaValue::I8(self.take(1, what)?[0] as i8),
            2 => {
                let b = self.take(2, what)?;
                MetaValue::U16(u16::from_le_bytes([b[0], b[1]]))
            }
            3 => {
                let b = self.take(2, what)?;
                MetaValue::I16(i16::from_le_bytes([b[0], b[1]]))
            }
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => {
                let b = self.take(1, what)?[0];
                if b > 1 {
                    return Err(GgufErrorKind::Malformed { what: what(), detail: format!("bool byte {b}") });
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(GgufErrorKind::Malformed { what: what(), detail: "arrays nested too deep".into() });
                }
                let elem = self.u32(what)?;
                let n = self.count(what)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => {
                return Err(GgufErrorKind::Malformed { what: what(), detail: format!("unknown value type {t}") });
            }
        })
    }
}

impl GgufFile {
    /// Open and index a GGUF file. Nothing but the header and index is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let err = |kind| GgufError { path: path.clone(), kind };
        let file = std::fs::File::open(&path).map_err(|e| err(e.into()))?;
        // SAFETY: the map is read-only and private to this process; a file truncated underneath us
        // is the one hazard of any mmap reader, as in llama.cpp.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(e.into()))?;
        Self::parse(path.clone(), map).map_err(err)
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<Self, GgufErrorKind> {
        let mut c = Cursor { buf: &map, pos: 0 };
        let magic = c.take(4, &|| "the magic".into())?;
        if magic != b"GGUF" {
            let mut found = [0u8; 4];
            found.copy_from_slice(magic);
            return Err(GgufErrorKind::BadMagic { found });
        }
        let version = c.u32(&|| "the version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufErrorKind::UnsupportedVersion(version));
        }
        let n_tensors = c.count(&|| "the tensor count".into())?;
        let n_kv = c.count(&|| "the metadata count".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let what = || format!("metadata value of '{key}'");
            let ty = c.u32(&what)?;
            let v = c.value(ty, &what, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor name #{i}"))?;
            let what = || format!("tensor info of '{name}'");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufErrorKind::Malformed { what: what(), detail: format!("{n_dims} dimensions (1..=4 allowed)") });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let type_id = c.u32(&what)?;
            let ty = GgmlType::from_id(type_id).ok_or(GgufErrorKind::UnknownType { tensor: name.clone(), type_id })?;
            let offset = c.u64(&what)?;
            tensors.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| GgufErrorKind::Malformed {
                what: "general.alignment".into(),
                detail: format!("{v:?} is not a power of two"),
            })?,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let mut infos = Vec::with_capacity(tensors.len());
        let mut by_name = BTreeMap::new();
        for (name, dims, ty, offset) in tensors {
            let n_elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let n_bytes = match (ty.format(), n_elems) {
                (Some(f), Some(n)) => {
                    let block = f.block_len() as u64;
                    if dims[0] % block != 0 {
                        return Err(GgufErrorKind::BadRowLength { tensor: name, dim0: dims[0], block });
                    }
                    n / block * f.block_bytes() as u64
                }
                // Unsupported types stay indexed (so `info` can list them); reading one is an error.
                (None, Some(_)) => 0,
                (_, None) => {
                    return Err(GgufErrorKind::Malformed {
                        what: format!("tensor '{name}'"),
                        detail: format!("dimensions {dims:?} overflow"),
                    })
                }
            };
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => {
                    by_name.insert(name.clone(), infos.len());
                    infos.push(TensorInfo { name, dims, ty, file_offset: s, n_bytes });
                }
                _ => {
                    return Err(GgufErrorKind::TensorOutOfBounds {
                        tensor: name,
                        start: offset,
                        end: offset.saturating_add(n_bytes),
                        file_len,
                    })
                }
            }
        }
        Ok(Self { path, map, version, metadata, tensors: infos, by_name })
    }

    fn err(&self, kind: GgufErrorKind) -> GgufError {
        GgufError { path: self.path.clone(), kind }
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's index entry, if present.
    pub fn find_tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's index entry, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.find_tensor(name).ok_or_else(|| self.err(GgufErrorKind::MissingTensor(name.into())))
    }

    /// A tensor's bytes and format; unsupported types are an error naming the tensor.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<(BlockFormat, &[u8]), GgufError> {
        let f = info.format().map_err(|k| self.err(k))?;
        let s = info.file_offset as usize;
        Ok((f, &self.map[s..s + info.n_bytes as usize]))
    }

    /// A whole tensor dequantized to f32 (small tensors: norms, biases; and tests).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name)?;
        let (f, bytes) = self.tensor_data(info)?;
        let mut out = vec![0f32; info.n_elements() as usize];
        super::dequantize(f, bytes, &mut out);
        Ok(out)
    }

    /// Check a tensor's dimensions (ggml order) and return its entry.
    pub fn tensor_with_shape(&self, name: &str, dims: &[u64]) -> Result<&TensorInfo, GgufError> {
        let t = self.tensor(name)?;
        if t.dims != dims {
            return Err(self.err(GgufErrorKind::WrongShape { tensor: name.into(), expected: dims.to_vec(), found: t.dims.clone() }));
        }
        Ok(t)
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.meta(key).ok_or_else(|| self.err(GgufErrorKind::MissingKey(key.into())))
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &MetaValue) -> GgufError {
        self.err(GgufErrorKind::WrongType { key: key.into(), expected, found: v.type_name() })
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong(key, "unsigned integer", v))
    }

    /// A required number.
    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, "number", v))
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(self.wrong(key, "string", v)),
        }
    }

    /// An optional boolean (absent = `None`).
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "bool", v)),
        }
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(self.wrong(key, "array", v)),
        }
    }

    /// A required array of strings.
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                v => Err(self.wrong(key, "array of strings", v)),
            })
            .collect()
    }
}
