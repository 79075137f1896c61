//! Kernel parameter blocks written once: a launcher declares its block with [`uniform_block!`],
//! and that Rust struct is the source of the WGSL `struct` its shader reads (placed in the
//! shader's prelude by [`super::ShaderSource`]) and of the bytes the recorder uploads, laid out by
//! WGSL's uniform address-space rules. Nothing is padded by hand.

/// A type a uniform block may hold: its WGSL spelling, alignment and bytes.
pub trait UniformField: Copy {
    /// Alignment in the uniform address space (WGSL's `AlignOf`, rounded up to 16 for arrays).
    const ALIGN: usize;
    /// The WGSL type.
    fn wgsl_type() -> String;
    /// Append the value's bytes.
    fn put(&self, out: &mut Vec<u8>);
}

macro_rules! scalar_field {
    ($($t:ty => $name:literal),*) => {$(
        impl UniformField for $t {
            const ALIGN: usize = 4;
            fn wgsl_type() -> String {
                $name.into()
            }
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
scalar_field!(u32 => "u32", i32 => "i32", f32 => "f32");

/// `array<vec4<u32>, N>`: a uniform array's stride must be a multiple of 16, so per-item records
/// (the LoRA slots) are packed four words each.
impl<const N: usize> UniformField for [[u32; 4]; N] {
    const ALIGN: usize = 16;
    fn wgsl_type() -> String {
        format!("array<vec4<u32>, {N}>")
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend(self.iter().flatten().flat_map(|w| w.to_le_bytes()));
    }
}

/// A kernel's parameter block, bound at `@group(0) @binding(0)`.
pub trait UniformBlock {
    /// The WGSL declaration (`struct Name { ... }`), generated from the Rust fields.
    fn wgsl() -> String;
    /// Each field's name and byte offset, by WGSL's layout rules, and the bytes [`Self::write`]
    /// appends (the end of the last field rounded up to 16).
    fn layout() -> (Vec<(&'static str, usize)>, usize);
    /// Append the block's bytes (each field at its offset, the whole padded to 16 bytes).
    fn write(&self, out: &mut Vec<u8>);
}

/// Pad `out` with zeros so that `out.len() - start` is a multiple of `align`.
pub fn align_to(out: &mut Vec<u8>, start: usize, align: usize) {
    let len = (out.len() - start).div_ceil(align) * align;
    out.resize(start + len, 0);
}

/// Declare a kernel's parameter block once: the Rust struct, its WGSL declaration (named after
/// the struct) and its layout ([`UniformBlock`]).
///
/// ```ignore
/// uniform_block! {
///     /// What the block holds.
///     pub(super) struct Params { rows: u32, eps: f32, slots: [[u32; 4]; MAX_SLOTS] }
/// }
/// ```
macro_rules! uniform_block {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug)]
        $vis struct $name {
            $($(#[$fmeta])* $vis $field: $ty,)*
        }

        impl $crate::gpu::UniformBlock for $name {
            fn wgsl() -> String {
                let mut s = format!("struct {} {{\n", stringify!($name));
                $(s.push_str(&format!("    {}: {},\n", stringify!($field), <$ty as $crate::gpu::UniformField>::wgsl_type()));)*
                s.push_str("}\n");
                s
            }
            fn layout() -> (Vec<(&'static str, usize)>, usize) {
                let mut out = Vec::new();
                let mut at = 0usize;
                $(
                    at = at.div_ceil(<$ty as $crate::gpu::UniformField>::ALIGN) * <$ty as $crate::gpu::UniformField>::ALIGN;
                    out.push((stringify!($field), at));
                    at += std::mem::size_of::<$ty>();
                )*
                (out, at.div_ceil(16) * 16)
            }
            fn write(&self, out: &mut Vec<u8>) {
                let start = out.len();
                $(
                    $crate::gpu::align_to(out, start, <$ty as $crate::gpu::UniformField>::ALIGN);
                    $crate::gpu::UniformField::put(&self.$field, out);
                )*
                $crate::gpu::align_to(out, start, 16);
            }
        }
    };
}
pub(crate) use uniform_block;

#[cfg(test)]
mod tests {
    use super::*;

    uniform_block! {
        struct Probe { a: u32, b: f32, slots: [[u32; 4]; 2], c: i32 }
    }

    #[test]
    fn fields_land_at_their_wgsl_offsets() {
        let p = Probe { a: 1, b: 2.0, slots: [[3, 4, 5, 6], [7, 8, 9, 10]], c: -1 };
        let mut out = vec![0xff];
        p.write(&mut out);
        let bytes = &out[1..];
        assert_eq!(Probe::layout(), (vec![("a", 0), ("b", 4), ("slots", 16), ("c", 48)], 64));
        assert_eq!(bytes.len(), 64);
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!((word(0), f32::from_bits(word(4)), word(8), word(16), word(44), word(48) as i32), (1, 2.0, 0, 3, 10, -1));
        assert!(Probe::wgsl().contains("slots: array<vec4<u32>, 2>,"));
    }
}
