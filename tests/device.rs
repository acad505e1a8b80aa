//! Devices: the CPU always works; probing for a GPU never panics and, where there is none (no
//! `cuda` feature, or no driver or GPU), gives a one-line `Error::NoCuda`. Every test also passes
//! on a GPU machine, where it checks the GPU path instead.

#[macro_use]
mod common;

use tessera::{Device, Error, Tensor};

/// The reason inside a `NoCuda` error, after checking that the error is one and reads as one line.
fn no_cuda_reason(error: &Error) -> &str {
    let Error::NoCuda(reason) = error else {
        panic!("expected Error::NoCuda, got {error:?}");
    };
    let message = error.to_string();
    assert!(!reason.trim().is_empty(), "empty reason: {message:?}");
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "not one line: {message:?}"
    );
    assert!(message.starts_with("no CUDA device"), "{message}");
    assert!(message.contains(reason.as_str()), "{message}");
    reason
}

#[test]
fn cpu_always_works() {
    let cpu = Device::Cpu;
    assert!(!cpu.is_cuda());
    cpu.synchronize().unwrap();
    assert_eq!(cpu, Device::Cpu);
    assert_eq!(cpu.clone(), cpu);
    let tensor = Tensor::from_vec(vec![1u8, 2, 3], &[3], &cpu).unwrap();
    assert_eq!(tensor.device(), Device::Cpu);
    assert_eq!(tensor.to_vec::<u8>().unwrap(), [1, 2, 3]);
}

#[test]
fn display_and_debug() {
    assert_eq!(Device::Cpu.to_string(), "cpu");
    assert_eq!(format!("{:?}", Device::Cpu), "cpu");
    if let Ok(gpu) = Device::cuda(0) {
        assert_eq!(gpu.to_string(), "cuda:0");
        assert_eq!(format!("{gpu:?}"), "cuda:0");
    }
    let count = Device::cuda_device_count();
    if count > 1 {
        assert_eq!(
            Device::cuda(count - 1).unwrap().to_string(),
            format!("cuda:{}", count - 1)
        );
    }
}

/// `Device::cuda(0)` either gives a GPU, and everything agrees there is one, or a one-line
/// `NoCuda`, and everything agrees there is none.
#[test]
fn cuda_probe_is_consistent() {
    match Device::cuda(0) {
        Err(error) => {
            let reason = no_cuda_reason(&error);
            eprintln!("no GPU here: {reason}");
            assert!(
                !common::require_gpu(),
                "TESSERA_REQUIRE_GPU=1 but Device::cuda(0) failed: {error}"
            );
            assert_eq!(Device::cuda_device_count(), 0);
            let fallback = Device::cuda_if_available();
            assert_eq!(fallback, Device::Cpu);
            assert!(!fallback.is_cuda());
            // Asking again gives the same answer, still without panicking.
            assert_eq!(Device::cuda(0).unwrap_err().to_string(), error.to_string());
        }
        Ok(gpu) => {
            assert!(gpu.is_cuda());
            assert_ne!(gpu, Device::Cpu);
            assert!(Device::cuda_device_count() >= 1);
            // The same ordinal is the same device (one context and stream).
            assert_eq!(Device::cuda(0).unwrap(), gpu);
            let fallback = Device::cuda_if_available();
            assert!(fallback.is_cuda());
            assert_eq!(fallback, gpu);
            gpu.synchronize().unwrap();
            let tensor = Tensor::from_vec(vec![7u32; 3], &[3], &gpu).unwrap();
            assert_eq!(tensor.device(), gpu);
            assert_eq!(tensor.to_vec::<u32>().unwrap(), [7, 7, 7]);
        }
    }
}

/// An ordinal past the last GPU is an error on every machine, and never a panic.
#[test]
fn cuda_ordinal_out_of_range_is_an_error() {
    for ordinal in [1000, usize::MAX] {
        let error = Device::cuda(ordinal).unwrap_err();
        no_cuda_reason(&error);
        if Device::cuda_device_count() > 0 {
            assert!(error.to_string().contains(&ordinal.to_string()), "{error}");
        }
    }
    let count = Device::cuda_device_count();
    no_cuda_reason(&Device::cuda(count).unwrap_err());
    if count > 0 {
        Device::cuda(count - 1).unwrap();
    }
}

/// Built without the feature, the error says how to get CUDA.
#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_feature_the_error_names_it() {
    let error = Device::cuda(0).unwrap_err();
    let reason = no_cuda_reason(&error);
    assert!(reason.contains("`cuda` feature"), "{reason}");
    assert_eq!(Device::cuda_device_count(), 0);
    assert_eq!(Device::cuda_if_available(), Device::Cpu);
}

/// Probing from many threads at once is safe and agrees.
#[test]
fn concurrent_probes_agree() {
    let answers: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| Device::cuda(0).map(|d| d.to_string()).map_err(|e| e.to_string())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}
