//! Tensor maps (`CUtensorMap`) for the TMA copies of the sm_90a kernels, encoded with
//! `cuTensorMapEncodeTiled`.
//!
//! The driver rejects a map that breaks one of its rules with a bare "invalid value"; [`Tiled`]
//! checks those rules first (on the host, so that a mistake shows before any GPU runs) and says
//! which one failed: every dimension at least 1 and at most 2³², strides in bytes that are
//! multiples of 16 below 2⁴⁰ and leave no overlap, boxes of 1 to 256 elements per dimension whose
//! innermost extent is a multiple of 16 bytes (and at most 128 bytes with the 128-byte swizzle),
//! and a 16-byte aligned address.

use crate::cuda::CudaContextExt;
use crate::error::{Error, Result};
use cudarc::driver::sys;

/// A TMA descriptor, passed by value as a `__grid_constant__` kernel parameter
/// (`tessera::TensorMap` in kernels/common/hopper.cuh).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: the 128 opaque bytes of a CUtensorMap, which the kernels declare as such.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// The element types the maps describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Element {
    BF16,
    F16,
    U32,
}

impl Element {
    pub(crate) fn bytes(self) -> u64 {
        match self {
            Element::BF16 | Element::F16 => 2,
            Element::U32 => 4,
        }
    }

    fn data_type(self) -> sys::CUtensorMapDataType {
        match self {
            Element::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            Element::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            Element::U32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
        }
    }
}

/// How TMA lays a box out in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Swizzle {
    /// Rows of the box back to back.
    None,
    /// The 128-byte swizzle that wgmma's descriptors read (swizzle mode 1): 16-byte chunk j of
    /// row r of every 1024 bytes lands at chunk j ^ (r % 8).
    Bytes128,
}

/// The geometry of a tiled map: `dims` innermost first, `strides` in bytes of dims 1.. (one fewer
/// than `dims`), and the box one copy reads, per dimension. Every element stride is 1, nothing
/// is interleaved, and reads out of bounds return zeros (TMA still writes the whole box).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiled<'a> {
    pub element: Element,
    pub dims: &'a [u64],
    pub strides: &'a [u64],
    pub boxes: &'a [u32],
    pub swizzle: Swizzle,
}

impl Tiled<'_> {
    /// The bytes one copy writes to shared memory (what its mbarrier must expect), edges
    /// included: TMA fills the part of the box out of bounds with zeros. The kernels hold these
    /// counts as constants; the tests compare them with the maps built here.
    #[cfg(test)]
    pub(crate) fn box_bytes(&self) -> u64 {
        self.boxes.iter().map(|&b| u64::from(b)).product::<u64>() * self.element.bytes()
    }

    /// Which of the driver's rules the map breaks, if any.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let rank = self.dims.len();
        if !(1..=5).contains(&rank) {
            return Err(format!("rank {rank} (1 to 5)"));
        }
        if self.strides.len() + 1 != rank || self.boxes.len() != rank {
            return Err(format!(
                "{} strides and {} box dimensions for rank {rank}",
                self.strides.len(),
                self.boxes.len()
            ));
        }
        if let Some((i, d)) = self.dims.iter().enumerate().find(|(_, &d)| d == 0 || d > 1 << 32) {
            return Err(format!("dimension {i} of {d} elements (1 to 2^32)"));
        }
        // The extent in bytes of the dimensions below each stride: a stride shorter than it
        // would make rows overlap.
        let mut extent = self.dims[0] * self.element.bytes();
        for (i, &stride) in self.strides.iter().enumerate() {
            if !stride.is_multiple_of(16) || stride >= 1 << 40 {
                return Err(format!(
                    "stride {} of {stride} bytes (a multiple of 16 below 2^40)",
                    i + 1
                ));
            }
            if stride < extent {
                return Err(format!(
                    "stride {} of {stride} bytes, below the {extent} bytes it steps over",
                    i + 1
                ));
            }
            extent = stride.saturating_mul(self.dims[i + 1]);
        }
        if let Some((i, b)) = self.boxes.iter().enumerate().find(|(_, &b)| b == 0 || b > 256) {
            return Err(format!("box dimension {i} of {b} elements (1 to 256)"));
        }
        let inner = u64::from(self.boxes[0]) * self.element.bytes();
        if !inner.is_multiple_of(16) {
            return Err(format!("a box {inner} bytes wide (a multiple of 16)"));
        }
        if self.swizzle == Swizzle::Bytes128 && inner > 128 {
            return Err(format!(
                "a box {inner} bytes wide with the 128-byte swizzle (at most 128)"
            ));
        }
        Ok(())
    }
}

/// Encodes the map of `geometry` over the device memory at `address`, which holds the tensor
/// `arg` of `op`; a geometry or address the driver would refuse is an `Err` naming them.
pub(crate) fn encode(op: &'static str, arg: &'static str, address: u64, geometry: &Tiled) -> Result<TensorMap> {
    if !address.is_multiple_of(16) {
        return Err(Error::invalid(
            op,
            arg,
            "a 16-byte aligned device tensor",
            format!("address {address:#x}"),
        ));
    }
    geometry
        .check()
        .map_err(|reason| Error::invalid(op, arg, "a tensor that TMA can describe", reason))?;
    let rank = geometry.dims.len();
    let element_strides = [1u32; 5];
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    // SAFETY: `check` made dims and boxes `rank` long and strides `rank - 1` long, and
    // element_strides holds at least `rank` entries; the caller passes the address of a live
    // device allocation that the dims and strides describe; `map` is a writable CUtensorMap.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            geometry.element.data_type(),
            rank as u32,
            address as *mut std::ffi::c_void,
            geometry.dims.as_ptr(),
            geometry.strides.as_ptr(),
            geometry.boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            match geometry.swizzle {
                Swizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                Swizzle::Bytes128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            },
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .context("cuTensorMapEncodeTiled")?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: Tiled = Tiled {
        element: Element::BF16,
        dims: &[128, 3, 1023, 2],
        strides: &[256, 768, 785_664],
        boxes: &[64, 1, 128, 1],
        swizzle: Swizzle::Bytes128,
    };

    #[test]
    fn a_token_map_passes_and_its_box_is_16_kib() {
        assert_eq!(TOKENS.check(), Ok(()));
        assert_eq!(TOKENS.box_bytes(), 64 * 128 * 2);
    }

    #[test]
    fn every_rule_is_checked() {
        let broken = [
            Tiled {
                dims: &[128, 3, 0, 2],
                ..TOKENS
            },
            Tiled {
                dims: &[128, 3, (1 << 32) + 1, 2],
                ..TOKENS
            },
            Tiled {
                strides: &[256, 776, 785_664],
                ..TOKENS
            },
            Tiled {
                strides: &[256, 768, 1 << 40],
                ..TOKENS
            },
            Tiled {
                strides: &[240, 768, 785_664],
                ..TOKENS
            },
            Tiled {
                strides: &[256, 768],
                ..TOKENS
            },
            Tiled {
                boxes: &[64, 1, 257, 1],
                ..TOKENS
            },
            Tiled {
                boxes: &[64, 0, 128, 1],
                ..TOKENS
            },
            Tiled {
                boxes: &[128, 1, 128, 1],
                ..TOKENS
            },
            Tiled {
                boxes: &[4, 1, 128, 1],
                swizzle: Swizzle::None,
                ..TOKENS
            },
            Tiled {
                dims: &[],
                strides: &[],
                boxes: &[],
                ..TOKENS
            },
        ];
        for geometry in broken {
            assert!(geometry.check().is_err(), "{geometry:?} passed");
        }
        let wide = Tiled {
            boxes: &[128, 1, 128, 1],
            swizzle: Swizzle::None,
            ..TOKENS
        };
        assert_eq!(wide.check(), Ok(()));
    }
}
