//! copy_columns: the copied block matches, everything else in the destination is untouched, on
//! every dtype, on odd widths and offsets (which select narrower accesses on the GPU), and bad
//! ranges are errors.

#[macro_use]
mod common;

use rand::Rng;
use tessera::ops::copy_columns;
use tessera::{DType, Device, Tensor};

/// Random bytes as a tensor of `dtype` (every bit pattern is fine: the op only moves bytes).
fn random_tensor(rng: &mut impl Rng, shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let bytes: Vec<u8> = (0..shape.iter().product::<usize>() * dtype.size_in_bytes())
        .map(|_| rng.random())
        .collect();
    Tensor::from_bytes(&bytes, dtype, shape, device).unwrap()
}

/// `shape` is (rows, src columns, dst columns), `copy` is (src start, dst start, width).
fn check(device: &Device, dtype: DType, shape: (usize, usize, usize), copy: (usize, usize, usize)) {
    let ((rows, src_columns, dst_columns), (src_start, dst_start, width)) = (shape, copy);
    let mut rng = common::rng();
    let src = random_tensor(&mut rng, &[rows, src_columns], dtype, device);
    let mut dst = random_tensor(&mut rng, &[rows, dst_columns], dtype, device);
    let before = dst.to_bytes().unwrap();
    copy_columns(&src, src_start, &mut dst, dst_start, width).unwrap();
    let (source, after) = (src.to_bytes().unwrap(), dst.to_bytes().unwrap());
    let e = dtype.size_in_bytes();
    let mut expected = before;
    for r in 0..rows {
        let from = (r * src_columns + src_start) * e;
        let to = (r * dst_columns + dst_start) * e;
        expected[to..to + width * e].copy_from_slice(&source[from..from + width * e]);
    }
    assert!(
        after == expected,
        "{dtype} rows {rows}: src {src_columns} cols from {src_start}, dst {dst_columns} cols from {dst_start}, width {width}"
    );
}

fn splits_and_joins(device: &Device) {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::U8, DType::U32] {
        // A fused query-key-value output split into its parts, and SwiGLU's halves joined.
        check(device, dtype, (17, 3 * 64, 64), (64, 0, 64));
        check(device, dtype, (113, 96, 2 * 96), (0, 96, 96));
        // Odd offsets and widths force narrow accesses.
        check(device, dtype, (7, 31, 29), (3, 5, 23));
        check(device, dtype, (1, 1, 1), (0, 0, 1));
        check(device, dtype, (1025, 40, 24), (9, 1, 15));
    }
}

fn small_copy(device: &Device) {
    check(device, DType::BF16, (3, 24, 16), (8, 0, 16));
}

fn bad_ranges_are_errors(device: &Device) {
    let src = Tensor::zeros(&[4, 8], DType::F32, device).unwrap();
    let mut dst = Tensor::zeros(&[4, 6], DType::F32, device).unwrap();
    common::assert_invalid(copy_columns(&src, 4, &mut dst, 0, 5), "copy_columns", "src_start", &[]);
    common::assert_invalid(copy_columns(&src, 0, &mut dst, 2, 5), "copy_columns", "dst_start", &[]);
    common::assert_invalid(
        copy_columns(&src, usize::MAX, &mut dst, 0, 2),
        "copy_columns",
        "src_start",
        &[],
    );
    let mut short = Tensor::zeros(&[3, 6], DType::F32, device).unwrap();
    common::assert_invalid(copy_columns(&src, 0, &mut short, 0, 2), "copy_columns", "dst", &[]);
    let mut other = Tensor::zeros(&[4, 6], DType::BF16, device).unwrap();
    common::assert_invalid(copy_columns(&src, 0, &mut other, 0, 2), "copy_columns", "dst", &[]);
    // The destination is untouched by a refused copy.
    assert!(dst.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
}

on_each_device!(splits_and_joins, small_copy, bad_ranges_are_errors);
