//! A small GGUF (v3) writer: tests build tiny random models with it, and tools can too.

use super::{GgmlType, MetaValue};
use std::io::Write;

/// Collects metadata and tensors, then writes a GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

const ALIGNMENT: usize = 32;

fn value_type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map(value_type_id).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a metadata entry.
    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Add a tensor with raw bytes already in `ty`'s block layout; dims in ggml order.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, bytes));
        self
    }

    /// Add an f32 tensor.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        self.tensor(name, dims, GgmlType::F32, bytemuck::cast_slice(values).to_vec())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&value_type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        }
        out
    }

    /// Write the file.
    pub fn write(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GgufErrorKind, GgufFile};
    use super::*;

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("llama.block_count", MetaValue::U32(2))
            .meta("tokenizer.ggml.tokens", MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("b".into())]))
            .tensor_f32("norm", &[4], &[1.0, 2.0, 3.0, 4.0])
            .tensor_f32("m", &[4, 2], &[0.5; 8]);
        w
    }

    fn write_tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("agentflux-gguf-{}-{name}.gguf", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn round_trip() {
        let p = write_tmp("rt", &sample().to_bytes());
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.str("general.architecture").unwrap(), "llama");
        assert_eq!(f.str_array("tokenizer.ggml.tokens").unwrap(), vec!["a", "b"]);
        assert_eq!(f.tensor_f32("norm").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(f.tensor("m").unwrap().matrix_shape(), (2, 4));
        let e = f.u64("general.architecture").unwrap_err().to_string();
        assert!(e.contains("general.architecture") && e.contains("string"), "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn version_2_reads_and_other_versions_are_refused() {
        // v2 and v3 share the layout (u64 counts); v1 used u32 counts and is refused.
        for (version, ok) in [(2u32, true), (1, false), (4, false)] {
            let mut b = sample().to_bytes();
            b[4..8].copy_from_slice(&version.to_le_bytes());
            let p = write_tmp(&format!("v{version}"), &b);
            match GgufFile::open(&p) {
                Ok(f) => assert!(ok && f.version == version && f.tensor_f32("norm").unwrap() == vec![1.0, 2.0, 3.0, 4.0]),
                Err(e) => assert!(!ok && matches!(e.kind, GgufErrorKind::UnsupportedVersion(v) if v == version), "{e}"),
            }
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut b = sample().to_bytes();
        b[0..4].copy_from_slice(b"GGML");
        let p = write_tmp("magic", &b);
        let e = GgufFile::open(&p).err().unwrap();
        assert!(matches!(e.kind, GgufErrorKind::BadMagic { .. }));
        assert!(e.to_string().contains(&p.display().to_string()));
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = sample().to_bytes();
        for cut in (0..b.len()).step_by(3) {
            let p = write_tmp("trunc", &b[..cut]);
            let r = GgufFile::open(&p);
            assert!(r.is_err(), "a file cut at {cut} of {} bytes was accepted", b.len());
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn tensor_past_end_names_the_tensor() {
        let b = sample().to_bytes();
        let p = write_tmp("past", &b[..b.len() - 8]);
        let e = GgufFile::open(&p).err().unwrap();
        match &e.kind {
            GgufErrorKind::TensorOutOfBounds { tensor, .. } => assert_eq!(tensor, "m"),
            k => panic!("unexpected {k}"),
        }
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn unknown_and_unsupported_types() {
        let mut w = sample();
        w.tensor("weird", &[32], GgmlType::Other(16), vec![]);
        let p = write_tmp("unsup", &w.to_bytes());
        let f = GgufFile::open(&p).unwrap();
        let e = f.tensor_data(f.tensor("weird").unwrap()).unwrap_err().to_string();
        assert!(e.contains("weird") && e.contains("IQ2_XXS") && e.contains("does not support"), "{e}");
        std::fs::remove_file(&p).ok();

        let mut b = sample().to_bytes();
        let idx = find_last_type_id(&b);
        b[idx..idx + 4].copy_from_slice(&999u32.to_le_bytes());
        let p = write_tmp("unknown", &b);
        let e = GgufFile::open(&p).err().unwrap();
        assert!(matches!(e.kind, GgufErrorKind::UnknownType { type_id: 999, .. }), "{e}");
        std::fs::remove_file(p).ok();
    }

    /// Byte position of the type id of tensor "m" (the last) in `sample()`'s index.
    fn find_last_type_id(b: &[u8]) -> usize {
        let key = [1u64.to_le_bytes().as_slice(), b"m", &2u32.to_le_bytes()].concat();
        let at = b.windows(key.len()).position(|w| w == key.as_slice()).unwrap();
        at + key.len() + 2 * 8
    }
}
