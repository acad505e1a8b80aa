//! Tensors: construction, copies between devices, metadata, reshape, fill, and their errors; plus
//! checks of the shared test helpers themselves.

#[macro_use]
mod common;

use common::{assert_invalid, bytes, relative_error};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tessera::{DType, Device, Element, Tensor};

on_each_device!(
    small_round_trip_every_dtype,
    round_trip_through_the_host,
    from_slice_copies,
    from_vec_wrong_count_is_an_error,
    to_vec_wrong_type_is_an_error,
    zeros_every_dtype,
    metadata,
    reshape_keeps_the_data,
    reshape_to_another_count_is_an_error,
    fill_bytes_sets_every_byte,
    copy_from_every_direction,
    copy_from_mismatch_is_an_error,
    tensors_move_between_threads,
    zeros_too_large_for_memory_is_an_error,
    round_trip_property,
    wrapped_host_memory_copies_to_and_from_the_device,
    small_wrapped_device_memory,
);

/// Data of every dtype whose bit patterns are all distinct and mostly non-zero, NaN included.
fn sample<T: Element>(len: usize, from_bits: impl Fn(u32) -> T) -> Vec<T> {
    (0..len as u32)
        .map(|i| from_bits(i.wrapping_mul(2_654_435_761).rotate_left(7) | 1))
        .collect()
}

/// from_vec on `device`, to_vec back, compared as bytes; and the tensor says where it is.
fn round_trip<T: Element + PartialEq>(device: &Device, data: Vec<T>, shape: &[usize]) {
    let tensor = Tensor::from_vec(data.clone(), shape, device).unwrap();
    assert_eq!(tensor.device(), *device);
    assert_eq!(tensor.dtype(), T::DTYPE);
    assert_eq!(tensor.shape(), shape);
    let back = tensor.to_vec::<T>().unwrap();
    assert_eq!(raw(&back), raw(&data), "{} round trip on {device}", T::DTYPE);
}

/// The bytes of a slice of plain values, so that NaNs compare by their bits.
fn raw<T: Element>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

fn small_round_trip_every_dtype(device: &Device) {
    round_trip(device, sample(6, f32::from_bits), &[2, 3]);
    round_trip(device, sample(6, |b| bf16::from_bits(b as u16)), &[3, 2]);
    round_trip(device, sample(5, |b| f16::from_bits(b as u16)), &[5]);
    round_trip(device, sample(7, |b| b as u8), &[7, 1]);
    round_trip(device, sample(4, |b| b as u16), &[1, 2, 2]);
    round_trip(device, sample(3, |b| b), &[3]);
    // A scalar and an empty tensor.
    round_trip(device, vec![1.5f32], &[]);
    round_trip::<u32>(device, vec![], &[2, 0, 3]);
}

/// to_device(cpu) and back to `device`: on a GPU, a download and an upload; every copy is
/// independent of the original.
fn round_trip_through_the_host(device: &Device) {
    let data = sample(1000, |b| bf16::from_bits(b as u16));
    let tensor = Tensor::from_vec(data.clone(), &[10, 100], device).unwrap();
    let host = tensor.to_device(&Device::Cpu).unwrap();
    assert_eq!(host.device(), Device::Cpu);
    assert_eq!(host.shape(), &[10, 100]);
    let mut again = host.to_device(device).unwrap();
    assert_eq!(again.device(), *device);
    assert_eq!(bytes(&again), bytes(&tensor));
    assert_eq!(bytes(&host), raw(&data));

    // A copy on the same device does not share storage with the original.
    let mut same = tensor.to_device(device).unwrap();
    same.fill_bytes(0).unwrap();
    again.fill_bytes(7).unwrap();
    assert_eq!(bytes(&tensor), raw(&data));
    assert_eq!(bytes(&host), raw(&data));
    assert!(bytes(&same).iter().all(|&b| b == 0));

    let data = sample(257, |b| b as u16);
    let tensor = Tensor::from_vec(data.clone(), &[257], device).unwrap();
    assert_eq!(
        tensor
            .to_device(&Device::Cpu)
            .unwrap()
            .to_device(device)
            .unwrap()
            .to_vec::<u16>()
            .unwrap(),
        data
    );
}

fn from_slice_copies(device: &Device) {
    let data = [1.0f32, -2.0, 3.5, 0.25];
    let tensor = Tensor::from_slice(&data, &[2, 2], device).unwrap();
    assert_eq!(tensor.to_vec::<f32>().unwrap(), data);
    assert_invalid(
        Tensor::from_slice(&data, &[3], device),
        "Tensor::from_vec",
        "data",
        &["3", "4"],
    );
}

fn from_vec_wrong_count_is_an_error(device: &Device) {
    let message = assert_invalid(
        Tensor::from_vec(vec![0.5f32; 5], &[2, 3], device),
        "Tensor::from_vec",
        "data",
        &["6", "5", "[2, 3]"],
    );
    eprintln!("{message}");
    assert_invalid(
        Tensor::from_vec(vec![1u8; 7], &[], device),
        "Tensor::from_vec",
        "data",
        &["1", "7"],
    );
    assert_invalid(
        Tensor::from_vec(vec![bf16::ONE; 1], &[0], device),
        "Tensor::from_vec",
        "data",
        &["0", "1"],
    );
    // An element count that overflows usize is an error, not a panic or a huge allocation.
    assert!(Tensor::from_vec(vec![1u32; 4], &[usize::MAX, 2, 2], device).is_err());
}

fn to_vec_wrong_type_is_an_error(device: &Device) {
    let tensor = Tensor::from_vec(vec![1.0f32, 2.0], &[2], device).unwrap();
    assert_invalid(tensor.to_vec::<u32>(), "Tensor::to_vec", "T", &["f32", "u32"]);
    assert_invalid(tensor.to_vec::<bf16>(), "Tensor::to_vec", "T", &["f32", "bf16"]);
    let tensor = Tensor::from_vec(vec![f16::ONE; 4], &[4], device).unwrap();
    assert_invalid(tensor.to_vec::<bf16>(), "Tensor::to_vec", "T", &["f16", "bf16"]);
    assert_invalid(tensor.to_vec::<u16>(), "Tensor::to_vec", "T", &["f16", "u16"]);
    assert_eq!(tensor.to_vec::<f16>().unwrap(), vec![f16::ONE; 4]);
}

fn zeros_every_dtype(device: &Device) {
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::U8, DType::U16, DType::U32] {
        let tensor = Tensor::zeros(&[3, 5], dtype, device).unwrap();
        assert_eq!(tensor.dtype(), dtype);
        assert_eq!(tensor.shape(), &[3, 5]);
        assert_eq!(tensor.device(), *device);
        let data = bytes(&tensor);
        assert_eq!(data.len(), 15 * dtype.size_in_bytes());
        assert!(data.iter().all(|&b| b == 0), "{dtype} zeros on {device}");
    }
    let empty = Tensor::zeros(&[0, 4], DType::F32, device).unwrap();
    assert_eq!(empty.numel(), 0);
    assert!(empty.to_vec::<f32>().unwrap().is_empty());
    assert!(Tensor::zeros(&[usize::MAX, 3], DType::U8, device).is_err());
}

fn metadata(device: &Device) {
    let cases: [(&[usize], DType, usize, usize); 6] = [
        (&[2, 3, 4], DType::F32, 24, 96),
        (&[7], DType::BF16, 7, 14),
        (&[1, 1], DType::F16, 1, 2),
        (&[], DType::U32, 1, 4),
        (&[5, 0], DType::U16, 0, 0),
        (&[3, 2], DType::U8, 6, 6),
    ];
    for (shape, dtype, numel, size) in cases {
        let tensor = Tensor::zeros(shape, dtype, device).unwrap();
        assert_eq!(tensor.shape(), shape);
        assert_eq!(tensor.dtype(), dtype);
        assert_eq!(tensor.numel(), numel, "numel of {shape:?}");
        assert_eq!(tensor.size_in_bytes(), size, "size of {shape:?} {dtype}");
        assert_eq!(dtype.size_in_bytes() * numel, size);
        let debug = format!("{tensor:?}");
        assert!(debug.contains(&format!("{shape:?}")), "{debug}");
        assert!(debug.contains(dtype.name()), "{debug}");
        assert!(debug.contains(&device.to_string()), "{debug}");
    }
    assert!(DType::BF16.is_float() && DType::F32.is_float() && DType::F16.is_float());
    assert!(!DType::U8.is_float() && !DType::U16.is_float() && !DType::U32.is_float());
    assert_eq!(DType::BF16.to_string(), "bf16");
}

fn reshape_keeps_the_data(device: &Device) {
    let data: Vec<u32> = (0..24).collect();
    let tensor = Tensor::from_vec(data.clone(), &[2, 3, 4], device).unwrap();
    let tensor = tensor.reshape(&[6, 4]).unwrap();
    assert_eq!(tensor.shape(), &[6, 4]);
    assert_eq!(tensor.to_vec::<u32>().unwrap(), data);
    let tensor = tensor.reshape(&[24]).unwrap();
    assert_eq!(tensor.shape(), &[24]);
    assert_eq!(tensor.numel(), 24);
    assert_eq!(tensor.device(), *device);
    assert_eq!(tensor.to_vec::<u32>().unwrap(), data);
    let scalar = Tensor::from_vec(vec![3.0f32], &[1, 1], device).unwrap();
    assert_eq!(scalar.reshape(&[]).unwrap().shape(), &[] as &[usize]);
}

fn reshape_to_another_count_is_an_error(device: &Device) {
    let tensor = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    assert_invalid(
        tensor.reshape(&[4, 2]),
        "Tensor::reshape",
        "shape",
        &["6", "8", "[4, 2]"],
    );
    let tensor = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    assert_invalid(tensor.reshape(&[0]), "Tensor::reshape", "shape", &["6", "0"]);
    let tensor = Tensor::zeros(&[2, 3], DType::F32, device).unwrap();
    assert!(tensor.reshape(&[usize::MAX, 2]).is_err());
}

fn fill_bytes_sets_every_byte(device: &Device) {
    let mut tensor = Tensor::from_vec(vec![1.0f32; 33], &[3, 11], device).unwrap();
    tensor.fill_bytes(0xFF).unwrap();
    assert!(bytes(&tensor).iter().all(|&b| b == 0xFF));
    assert!(tensor.to_vec::<f32>().unwrap().iter().all(|x| x.is_nan()));
    tensor.fill_bytes(0x3F).unwrap();
    assert_eq!(tensor.to_vec::<f32>().unwrap(), vec![f32::from_bits(0x3F3F_3F3F); 33]);
    // 0xFF poisons every float dtype with NaN.
    let mut half = Tensor::zeros(&[9], DType::BF16, device).unwrap();
    half.fill_bytes(0xFF).unwrap();
    assert!(half.to_vec::<bf16>().unwrap().iter().all(|x| x.is_nan()));
    let mut half = Tensor::zeros(&[9], DType::F16, device).unwrap();
    half.fill_bytes(0xFF).unwrap();
    assert!(half.to_vec::<f16>().unwrap().iter().all(|x| x.is_nan()));
    let mut bytes_tensor = Tensor::zeros(&[5], DType::U8, device).unwrap();
    bytes_tensor.fill_bytes(0xA5).unwrap();
    assert_eq!(bytes_tensor.to_vec::<u8>().unwrap(), vec![0xA5; 5]);
    let mut empty = Tensor::zeros(&[0], DType::U16, device).unwrap();
    empty.fill_bytes(1).unwrap();
    assert!(empty.to_vec::<u16>().unwrap().is_empty());
}

/// copy_from into a tensor on `device` from one on the host, on the same device, and back.
fn copy_from_every_direction(device: &Device) {
    let data = sample(300, |b| bf16::from_bits(b as u16));
    let host = Tensor::from_vec(data.clone(), &[3, 100], &Device::Cpu).unwrap();
    let mut target = Tensor::zeros(&[3, 100], DType::BF16, device).unwrap();
    target.copy_from(&host).unwrap();
    assert_eq!(target.device(), *device);
    assert_eq!(bytes(&target), raw(&data));

    let mut second = Tensor::zeros(&[3, 100], DType::BF16, device).unwrap();
    second.fill_bytes(0xFF).unwrap();
    second.copy_from(&target).unwrap();
    assert_eq!(bytes(&second), raw(&data));

    let mut back = Tensor::zeros(&[3, 100], DType::BF16, &Device::Cpu).unwrap();
    back.copy_from(&second).unwrap();
    assert_eq!(bytes(&back), raw(&data));

    // The copy is independent of its source.
    target.fill_bytes(0).unwrap();
    assert_eq!(bytes(&second), raw(&data));
}

/// copy_from a source of another dtype or shape is an error that leaves the target unchanged.
fn copy_from_mismatch_is_an_error(device: &Device) {
    let mut target = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], device).unwrap();
    let before = bytes(&target);
    let wrong_dtype = Tensor::zeros(&[2, 2], DType::U32, device).unwrap();
    assert_invalid(
        target.copy_from(&wrong_dtype),
        "Tensor::copy_from",
        "source",
        &["f32", "u32"],
    );
    let wrong_shape = Tensor::zeros(&[4], DType::F32, &Device::Cpu).unwrap();
    assert_invalid(
        target.copy_from(&wrong_shape),
        "Tensor::copy_from",
        "source",
        &["[2, 2]", "[4]"],
    );
    let transposed = Tensor::zeros(&[1, 4], DType::F32, device).unwrap();
    assert!(target.copy_from(&transposed).is_err());
    assert_eq!(bytes(&target), before);
}

/// A tensor made on one thread can be filled, copied and read on another (which, on a GPU, has
/// not used the device before: every entry point must make the device's context current).
fn tensors_move_between_threads(device: &Device) {
    let mut tensor = Tensor::from_vec(vec![5u16; 100], &[100], device).unwrap();
    let device_copy = device.clone();
    let tensor = std::thread::spawn(move || {
        tensor.fill_bytes(0x11).unwrap();
        let mut copy = Tensor::zeros(&[100], DType::U16, &device_copy).unwrap();
        copy.copy_from(&tensor).unwrap();
        device_copy.synchronize().unwrap();
        (tensor, copy.to_vec::<u16>().unwrap())
    })
    .join()
    .unwrap();
    assert_eq!(tensor.1, vec![0x1111u16; 100]);
    let mut tensor = tensor.0;
    std::thread::spawn(move || {
        let mut tensor_2 = Tensor::zeros(&[100], DType::U16, &Device::Cpu).unwrap();
        tensor.fill_bytes(0x22).unwrap();
        tensor_2.copy_from(&tensor).unwrap();
        assert_eq!(tensor_2.to_vec::<u16>().unwrap(), vec![0x2222u16; 100]);
    })
    .join()
    .unwrap();
}

/// A shape whose element count fits in usize but whose size in bytes does not (or exceeds what
/// an allocation may be) is an error, like an element count that overflows, and never a panic or
/// a buffer of a wrapped-around size.
fn zeros_too_large_for_memory_is_an_error(device: &Device) {
    for (shape, dtype) in [
        (vec![1usize << 62], DType::F32),
        (vec![1usize << 31, 1 << 31], DType::U16),
        (vec![usize::MAX / 2 + 1], DType::BF16),
    ] {
        let result = std::panic::catch_unwind(|| Tensor::zeros(&shape, dtype, device));
        match result {
            Ok(Err(error)) => eprintln!("{shape:?} {dtype}: {error}"),
            Ok(Ok(tensor)) => panic!(
                "Tensor::zeros({shape:?}, {dtype}) on {device} succeeded: {tensor:?} holding {} bytes",
                tensor.size_in_bytes()
            ),
            Err(panic) => panic!(
                "Tensor::zeros({shape:?}, {dtype}) on {device} panicked instead of returning an error: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            ),
        }
    }
}

/// From bits, for the dtype with this index, so that one strategy covers every dtype.
fn round_trip_bits(device: &Device, dtype: usize, shape: &[usize], bits: &[u32]) {
    match dtype {
        0 => round_trip(device, bits.iter().map(|&b| f32::from_bits(b)).collect(), shape),
        1 => round_trip(device, bits.iter().map(|&b| bf16::from_bits(b as u16)).collect(), shape),
        2 => round_trip(device, bits.iter().map(|&b| f16::from_bits(b as u16)).collect(), shape),
        3 => round_trip(device, bits.iter().map(|&b| b as u8).collect(), shape),
        4 => round_trip(device, bits.iter().map(|&b| b as u16).collect(), shape),
        _ => round_trip(device, bits.to_vec(), shape),
    }
}

/// For random shapes (rank 0 to 4, dimensions 0 to 7), dtypes and data, from_vec then to_vec is
/// the identity, and numel is the product of the dimensions.
fn round_trip_property(device: &Device) {
    let seed = common::seed();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: if device.is_cuda() { 64 } else { 256 },
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = prop::collection::vec(0usize..8, 0..5).prop_flat_map(|shape| {
        let numel = shape.iter().product::<usize>();
        (Just(shape), 0usize..6, prop::collection::vec(any::<u32>(), numel))
    });
    runner
        .run(&strategy, |(shape, dtype, bits)| {
            let tensor = Tensor::from_vec(bits.clone(), &shape, device).unwrap();
            prop_assert_eq!(tensor.numel(), shape.iter().product::<usize>());
            prop_assert_eq!(tensor.numel(), bits.len());
            prop_assert_eq!(tensor.size_in_bytes(), 4 * bits.len());
            round_trip_bits(device, dtype, &shape, &bits);
            Ok(())
        })
        .unwrap();
}

// The helpers' own checks: the comparison must reject what the op tests rely on it to reject.

#[test]
fn comparison_rejects_non_finite_output() {
    let reference = [1.0, 2.0, 3.0];
    let error = relative_error(&[1.0, f64::NAN, 3.0], &reference).unwrap_err();
    assert!(error.contains("element 1"), "{error}");
    let error = relative_error(&[1.0, 2.0, f64::INFINITY], &reference).unwrap_err();
    assert!(error.contains("element 2"), "{error}");
    assert!(relative_error(&[1.0, 2.0], &reference).is_err());
    // A NaN-poisoned output that an op never wrote is caught through the conversions too.
    let mut poisoned = Tensor::zeros(&[3], DType::BF16, &Device::Cpu).unwrap();
    poisoned.fill_bytes(0xFF).unwrap();
    assert!(relative_error(&common::values::<bf16>(&poisoned), &reference).is_err());
}

#[test]
fn comparison_measures_relative_error() {
    let reference = [3.0, -4.0];
    assert_eq!(relative_error(&reference, &reference), Ok(0.0));
    let error = relative_error(&[3.0, -4.5], &reference).unwrap();
    assert!((error - 0.1).abs() < 1e-12, "{error}");
    assert_eq!(relative_error(&[0.0, 0.5], &[0.0, 0.0]), Ok(0.5));
    common::assert_close("equal", &[1.0, 2.0], &[1.0, 2.0 + 1e-9], 1e-6);
}

#[test]
#[should_panic(expected = "relative error")]
fn comparison_fails_beyond_the_tolerance() {
    common::assert_close("sign flip", &[1.0, -2.0], &[1.0, 2.0], 1e-2);
}

#[test]
fn random_inputs_are_in_range_and_not_all_zero() {
    let mut rng = common::rng();
    for len in [1, 2, 1000] {
        let values = common::uniform::<bf16>(&mut rng, len);
        assert_eq!(values.len(), len);
        assert!(values.iter().any(|v| v.to_f32() != 0.0));
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(&v.to_f32())));
    }
    let values = common::uniform::<f32>(&mut rng, 4096);
    let mean = values.iter().sum::<f32>() / 4096.0;
    assert!(mean.abs() < 0.1, "mean {mean}");
    assert!(values.iter().any(|&v| v < -0.9) && values.iter().any(|&v| v > 0.9));
}

/// Caller memory wrapped by `from_host_ptr` copied to `device` and back into another wrapped
/// buffer: the bytes arrive, and the wrapped memory is what changed.
fn wrapped_host_memory_copies_to_and_from_the_device(device: &Device) {
    let mut source = sample(231, |b| f16::from_bits(b as u16));
    let expected = raw(&source);
    let mut landing = vec![f16::NAN; 231];
    // SAFETY: both vectors outlive the tensors and are untouched while the tensors live.
    let (wrapped, mut back) = unsafe {
        (
            Tensor::from_host_ptr(source.as_mut_ptr().cast(), 462, &[11, 21], DType::F16).unwrap(),
            Tensor::from_host_ptr(landing.as_mut_ptr().cast(), 462, &[11, 21], DType::F16).unwrap(),
        )
    };
    let on_device = wrapped.to_device(device).unwrap();
    assert_eq!(on_device.device(), *device);
    back.copy_from(&on_device).unwrap();
    drop((wrapped, back));
    assert_eq!(raw(&landing), expected);
}

#[test]
fn wrapped_host_memory_is_used_in_place() {
    let mut a = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut b = vec![0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75];
    let mut out = vec![f32::NAN; 4];
    // SAFETY: the vectors outlive the tensors and are only read after the tensors are dropped.
    let (ta, tb, mut tout) = unsafe {
        (
            Tensor::from_host_ptr(a.as_mut_ptr().cast(), 24, &[2, 3], DType::F32).unwrap(),
            Tensor::from_host_ptr(b.as_mut_ptr().cast(), 24, &[2, 3], DType::F32).unwrap(),
            Tensor::from_host_ptr(out.as_mut_ptr().cast(), 16, &[2, 2], DType::F32).unwrap(),
        )
    };
    assert_eq!(ta.device(), Device::Cpu);
    assert_eq!(
        (ta.shape(), ta.dtype(), ta.size_in_bytes()),
        (&[2usize, 3][..], DType::F32, 24)
    );
    tessera::ops::matmul_into(&ta, &tb, None, &mut tout, tessera::ops::MatmulOptions::linear()).unwrap();
    assert_eq!(ta.to_vec::<f32>().unwrap(), a);
    drop((ta, tb, tout));
    // out = a·bᵀ, small integers and quarters: exact in f32.
    let expected: Vec<f32> = (0..2)
        .flat_map(|i| (0..2).map(move |j| (i, j)))
        .map(|(i, j)| (0..3).map(|k| a[i * 3 + k] * b[j * 3 + k]).sum())
        .collect();
    assert_eq!(out, expected);

    // fill_bytes and copy_from write the caller's memory too; dropping the tensor leaves it.
    let mut bytes = vec![0u8; 10];
    // SAFETY: as above.
    let mut t = unsafe { Tensor::from_host_ptr(bytes.as_mut_ptr(), 10, &[10], DType::U8) }.unwrap();
    t.fill_bytes(0x5a).unwrap();
    t.copy_from(&Tensor::from_vec((0..10u8).collect(), &[10], &Device::Cpu).unwrap())
        .unwrap();
    drop(t);
    assert_eq!(bytes, (0..10u8).collect::<Vec<_>>());
}

#[test]
fn wrapping_host_memory_checks_its_arguments() {
    let op = "Tensor::from_host_ptr";
    let mut data = vec![0u32; 8];
    let base: *mut u8 = data.as_mut_ptr().cast();
    // SAFETY: every call either fails or wraps memory of `data`, which outlives the tensors.
    unsafe {
        assert_invalid(
            Tensor::from_host_ptr(base, 31, &[8], DType::U32),
            op,
            "bytes",
            &["32 bytes", "31 bytes"],
        );
        assert_invalid(
            Tensor::from_host_ptr(base, 32, &[9], DType::U32),
            op,
            "bytes",
            &["36 bytes"],
        );
        assert_invalid(
            Tensor::from_host_ptr(std::ptr::null_mut(), 32, &[8], DType::U32),
            op,
            "data",
            &["null"],
        );
        assert_invalid(
            Tensor::from_host_ptr(base.add(2), 28, &[7], DType::U32),
            op,
            "data",
            &["aligned to 4"],
        );
        assert_invalid(
            Tensor::from_host_ptr(base.add(1), 6, &[3], DType::BF16),
            op,
            "data",
            &["aligned to 2"],
        );
        assert_invalid(
            Tensor::from_host_ptr(base, 0, &[usize::MAX, 2], DType::U32),
            op,
            "shape",
            &[],
        );
        // Byte alignment suffices for u8, and an empty tensor needs no memory at all.
        let t = Tensor::from_host_ptr(base.add(3), 5, &[5], DType::U8).unwrap();
        assert_eq!(t.to_vec::<u8>().unwrap(), vec![0; 5]);
        let empty = Tensor::from_host_ptr(std::ptr::null_mut(), 0, &[0, 4], DType::F32).unwrap();
        assert_eq!(empty.numel(), 0);
    }
}

#[test]
fn shares_memory_with_sees_overlapping_wraps_only() {
    let mut data = vec![0f32; 16];
    let base: *mut u8 = data.as_mut_ptr().cast();
    // SAFETY: the wraps cover parts of `data`, which outlives them; nothing is read or written.
    let (first, middle, last, whole, empty) = unsafe {
        (
            Tensor::from_host_ptr(base, 32, &[8], DType::F32).unwrap(),
            Tensor::from_host_ptr(base.add(28), 8, &[2], DType::F32).unwrap(),
            Tensor::from_host_ptr(base.add(32), 32, &[8], DType::F32).unwrap(),
            Tensor::from_host_ptr(base, 64, &[4, 4], DType::F32).unwrap(),
            Tensor::from_host_ptr(base, 0, &[0], DType::F32).unwrap(),
        )
    };
    assert!(first.shares_memory_with(&whole) && whole.shares_memory_with(&last));
    assert!(middle.shares_memory_with(&first) && middle.shares_memory_with(&last));
    assert!(first.shares_memory_with(&first));
    assert!(!first.shares_memory_with(&last) && !last.shares_memory_with(&first));
    assert!(!empty.shares_memory_with(&whole) && !whole.shares_memory_with(&empty));
    let owned = Tensor::zeros(&[16], DType::F32, &Device::Cpu).unwrap();
    assert!(!owned.shares_memory_with(&whole));
    assert!(owned.shares_memory_with(&owned));
}

/// `from_device_ptr` checks size, address and alignment before it looks at the device, so that
/// every check runs without a GPU; a CPU device is refused last.
#[test]
fn device_pointer_checks() {
    const OP: &str = "Tensor::from_device_ptr";
    let cpu = Device::Cpu;
    let aligned = 0x7f00_0000_0000u64;
    // SAFETY: every call fails its checks before any memory could be touched.
    unsafe {
        assert_invalid(
            Tensor::from_device_ptr(&cpu, aligned, 20, &[2, 3], DType::F32),
            OP,
            "bytes",
            &["24 bytes"],
        );
        assert_invalid(
            Tensor::from_device_ptr(&cpu, 0, 24, &[2, 3], DType::F32),
            OP,
            "data",
            &["0x0"],
        );
        for offset in [2u64, 4, 16, 128] {
            let message = assert_invalid(
                Tensor::from_device_ptr(&cpu, aligned + offset, 24, &[2, 3], DType::F32),
                OP,
                "data",
                &["aligned to 256 bytes"],
            );
            assert!(message.contains(&format!("{:#x}", aligned + offset)), "{message}");
        }
        assert_invalid(
            Tensor::from_device_ptr(&cpu, aligned, usize::MAX, &[usize::MAX / 2, 4], DType::F32),
            OP,
            "shape",
            &[],
        );
        assert_invalid(
            Tensor::from_device_ptr(&cpu, aligned, 24, &[2, 3], DType::F32),
            OP,
            "device",
            &["CUDA device"],
        );
        assert_invalid(
            Tensor::from_device_ptr(&cpu, 0, 0, &[0, 3], DType::BF16),
            OP,
            "device",
            &["CUDA device"],
        );
    }
}

/// On a GPU, memory allocated outside tessera (with the driver's cuMemAlloc, as a C program's
/// cudaMalloc) is read and written in place through wrapped tensors and is never freed by them:
/// cuMemFree of each buffer succeeds afterwards, which it would not after a free by tessera.
/// Host memory, a range past the allocation and memory never allocated are refused. On the CPU,
/// wrapping device memory is refused.
fn small_wrapped_device_memory(device: &Device) {
    match device {
        Device::Cpu => {
            // SAFETY: refused before any memory could be touched.
            let result = unsafe { Tensor::from_device_ptr(device, 0x7f00_0000_0000, 4, &[1], DType::F32) };
            assert_invalid(result, "Tensor::from_device_ptr", "device", &["CUDA device"]);
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => wrapped_device_memory_on_gpu(device),
    }
}

#[cfg(feature = "cuda")]
fn wrapped_device_memory_on_gpu(device: &Device) {
    use cudarc::driver::{result as driver, CudaContext};
    const OP: &str = "Tensor::from_device_ptr";
    let (m, k, n) = (7usize, 33usize, 17usize);
    let mut rng = common::rng();
    let x_host = common::uniform::<f32>(&mut rng, m * k);
    let w_host = common::uniform::<f32>(&mut rng, n * k);
    // The primary context, which tessera uses too.
    let context = CudaContext::new(0).unwrap();
    context.bind_to_thread().unwrap();
    // SAFETY: plain driver allocations and synchronous copies of exactly their sizes; the
    // output's first 64 floats are a guard before the wrapped range, and everything starts NaN.
    let (x_address, out_base) = unsafe {
        let x_address = driver::malloc_sync(m * k * 4).unwrap();
        driver::memcpy_htod_sync(x_address, &x_host).unwrap();
        let out_base = driver::malloc_sync((64 + m * n) * 4).unwrap();
        driver::memcpy_htod_sync(out_base, &vec![f32::NAN; 64 + m * n]).unwrap();
        (x_address, out_base)
    };
    let w = Tensor::from_vec(w_host.clone(), &[n, k], device).unwrap();
    {
        // SAFETY: the allocations outlive the tensors; the synchronous copies above finished
        // before tessera uses them, and device.synchronize() runs before they are read again.
        let (x, mut out) = unsafe {
            (
                Tensor::from_device_ptr(device, x_address, m * k * 4, &[m, k], DType::F32).unwrap(),
                Tensor::from_device_ptr(device, out_base + 256, m * n * 4, &[m, n], DType::F32).unwrap(),
            )
        };
        assert_eq!(x.device(), *device);
        assert!(!x.shares_memory_with(&out) && x.shares_memory_with(&x));
        assert_eq!(x.to_vec::<f32>().unwrap(), x_host);
        tessera::ops::matmul_into(&x, &w, None, &mut out, tessera::ops::MatmulOptions::linear()).unwrap();
        device.synchronize().unwrap();
    }
    let mut out = vec![0f32; 64 + m * n];
    let mut x_back = vec![0f32; m * k];
    // SAFETY: synchronous copies of exactly the allocations' sizes.
    unsafe {
        driver::memcpy_dtoh_sync(&mut out, out_base).unwrap();
        driver::memcpy_dtoh_sync(&mut x_back, x_address).unwrap();
    }
    assert!(
        out[..64].iter().all(|v| v.is_nan()),
        "the guard before the wrapped range was written"
    );
    let reference: Vec<f64> = (0..m * n)
        .map(|i| {
            (0..k)
                .map(|j| x_host[i / n * k + j] as f64 * w_host[i % n * k + j] as f64)
                .sum()
        })
        .collect();
    let got: Vec<f64> = out[64..].iter().map(|&v| v as f64).collect();
    common::assert_close("matmul into wrapped device memory", &got, &reference, 1e-5);
    assert_eq!(x_back, x_host, "the input was changed");

    let mut host = vec![0u8; 1024];
    let host_address = (host.as_mut_ptr() as u64).next_multiple_of(256);
    // SAFETY: each call is refused on the driver's answer before any memory is touched.
    unsafe {
        let refused = |address: u64, elements: usize| {
            Tensor::from_device_ptr(device, address, elements * 4, &[elements], DType::F32)
        };
        assert_invalid(refused(host_address, 16), OP, "data", &["device memory"]);
        assert_invalid(refused(256, 1), OP, "data", &["device memory"]);
        assert_invalid(refused(x_address, m * k + (1 << 18)), OP, "bytes", &["allocation"]);
        assert_invalid(refused(out_base + 256, 64 + m * n), OP, "bytes", &["allocation"]);
    }
    // The owner frees each buffer, once; cuMemFree fails on memory that was freed already.
    // SAFETY: the tensors that wrapped them are gone and their work has finished.
    unsafe {
        driver::free_sync(x_address).unwrap();
        driver::free_sync(out_base).unwrap();
    }
}
