//! What the C tests cannot reach deterministically: a tensor held by another call (`BUSY`),
//! a panic caught by the guard, and handles created, used and freed from many threads at once.

use crate::device::*;
use crate::handle::{self, TesseraDevice, TesseraTensor};
use crate::matmul::tessera_matmul;
use crate::status::{guard, tessera_last_error, TesseraStatus};
use crate::tensor::*;
use std::ffi::CStr;

fn last_error() -> String {
    // SAFETY: tessera_last_error never returns NULL and the string lives until the next call.
    unsafe { CStr::from_ptr(tessera_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn cpu() -> *mut TesseraDevice {
    let mut device = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { tessera_device_new_cpu(&mut device) }, TesseraStatus::Ok);
    device
}

fn tensor(device: *mut TesseraDevice, values: &[f32], shape: &[usize]) -> *mut TesseraTensor {
    let mut t = std::ptr::null_mut();
    // SAFETY: the pointers cover what the lengths say.
    let status = unsafe {
        tessera_tensor_new_from_host(
            device,
            TesseraDtype::F32 as i32,
            shape.as_ptr(),
            shape.len(),
            values.as_ptr().cast(),
            std::mem::size_of_val(values),
            &mut t,
        )
    };
    assert_eq!(status, TesseraStatus::Ok, "{}", last_error());
    t
}

#[test]
fn a_tensor_in_use_elsewhere_is_busy_and_untouched() {
    let device = cpu();
    let a = tensor(device, &[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let out = tensor(device, &[9.0; 4], &[2, 2]);
    let shared_out = handle::tensor("test", "out", out).unwrap();
    let shared_a = handle::tensor("test", "a", a).unwrap();

    // Another call reading `out`: writing it is refused, reading it is not.
    let reading = shared_out.read().unwrap();
    // SAFETY: live handles; NULL options mean the defaults.
    let status = unsafe { tessera_matmul(a, a, std::ptr::null(), out, std::ptr::null()) };
    assert_eq!(status, TesseraStatus::Busy);
    assert!(last_error().contains("argument `out`"), "{}", last_error());
    let mut back = [0f32; 4];
    // SAFETY: `back` holds 16 bytes.
    let status = unsafe { tessera_tensor_copy_to_host(out, back.as_mut_ptr().cast(), 16) };
    assert_eq!(status, TesseraStatus::Ok);
    assert_eq!(back, [9.0; 4]);
    drop(reading);

    // Another call writing `a`: reading it is refused.
    let writing = shared_a.write().unwrap();
    // SAFETY: as above.
    let status = unsafe { tessera_matmul(a, a, std::ptr::null(), out, std::ptr::null()) };
    assert_eq!(status, TesseraStatus::Busy);
    assert!(last_error().contains("argument `a`"), "{}", last_error());
    drop(writing);

    // SAFETY: as above.
    assert_eq!(
        unsafe { tessera_matmul(a, a, std::ptr::null(), out, std::ptr::null()) },
        TesseraStatus::Ok
    );
    // SAFETY: `back` holds 16 bytes.
    unsafe { tessera_tensor_copy_to_host(out, back.as_mut_ptr().cast(), 16) };
    assert_eq!(back, [7.0, 10.0, 15.0, 22.0]);

    // A handle freed while a call still holds its tensor: the call's reference stays valid.
    // SAFETY: live handles, freed once.
    unsafe {
        assert_eq!(tessera_tensor_free(out), TesseraStatus::Ok);
        assert_eq!(shared_out.read().unwrap().shape(), &[2, 2]);
        assert_eq!(tessera_tensor_free(a), TesseraStatus::Ok);
        assert_eq!(tessera_device_free(device), TesseraStatus::Ok);
    }
}

#[test]
fn a_panic_becomes_an_internal_error_with_a_message() {
    let status = guard("tessera_test", || panic!("the message"));
    assert_eq!(status, TesseraStatus::Internal);
    assert_eq!(last_error(), "tessera_test: internal error: the message");
    assert_eq!(guard("tessera_test", || Ok(())), TesseraStatus::Ok);
    assert_eq!(last_error(), "");
}

#[test]
fn handles_work_from_many_threads_at_once() {
    let device = cpu() as usize;
    let weights = tensor(device as *mut _, &[0.5; 64], &[8, 8]) as usize;
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            std::thread::spawn(move || {
                for round in 0..20 {
                    let x = tensor(device as *mut _, &[(worker + round) as f32; 16], &[2, 8]);
                    let out = tensor(device as *mut _, &[f32::NAN; 16], &[2, 8]);
                    // SAFETY: live handles; the shared weights are only read.
                    let status =
                        unsafe { tessera_matmul(x, weights as *const _, std::ptr::null(), out, std::ptr::null()) };
                    assert_eq!(status, TesseraStatus::Ok, "{}", last_error());
                    let mut back = [0f32; 16];
                    // SAFETY: `back` holds 64 bytes; each handle is freed once.
                    unsafe {
                        assert_eq!(
                            tessera_tensor_copy_to_host(out, back.as_mut_ptr().cast(), 64),
                            TesseraStatus::Ok
                        );
                        assert_eq!(tessera_tensor_free(x), TesseraStatus::Ok);
                        assert_eq!(tessera_tensor_free(out), TesseraStatus::Ok);
                    }
                    assert!(back.iter().all(|&v| v == 4.0 * (worker + round) as f32), "{back:?}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    // SAFETY: live handles, freed once.
    unsafe {
        assert_eq!(tessera_tensor_free(weights as *mut _), TesseraStatus::Ok);
        assert_eq!(tessera_device_free(device as *mut _), TesseraStatus::Ok);
    }
}

#[test]
fn a_trainer_in_use_elsewhere_is_busy_and_unchanged() {
    use crate::trainer::*;
    let device = cpu();
    let toml = c"[model]\nlayers = 1\nheads = 2\nkv_heads = 2\nwidth = 16\nffn_width = 32\ncontext = 8\n[train]\nbatch = 1\nseq = 4\n";
    let mut trainer = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    let status =
        unsafe { tessera_trainer_new(device, c"tiny".as_ptr(), toml.as_ptr(), std::ptr::null(), &mut trainer) };
    assert_eq!(status, TesseraStatus::Ok, "{}", last_error());
    let tokens: Vec<u32> = (0..32).map(|i| i * 5 % 256).collect();
    let shared = handle::trainer("test", "trainer", trainer).unwrap();

    let held = shared.lock().unwrap();
    let mut record = TesseraStepRecord {
        step: 99,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        tokens: 0,
    };
    // SAFETY: live handle; `tokens` holds 32 ids.
    let status = unsafe { tessera_trainer_train_tokens(trainer, tokens.as_ptr(), 32, 1, &mut record) };
    assert_eq!(status, TesseraStatus::Busy);
    assert!(last_error().contains("argument `trainer`"), "{}", last_error());
    assert_eq!(held.step(), 0);
    assert_eq!(record.step, 99);
    drop(held);

    // SAFETY: as above.
    let status = unsafe { tessera_trainer_train_tokens(trainer, tokens.as_ptr(), 32, 1, &mut record) };
    assert_eq!(status, TesseraStatus::Ok, "{}", last_error());
    assert_eq!(record.step, 1);
    // A handle freed while a call holds the trainer: the call's reference stays valid.
    // SAFETY: live handles, freed once.
    unsafe {
        assert_eq!(tessera_trainer_free(trainer), TesseraStatus::Ok);
        assert_eq!(shared.lock().unwrap().step(), 1);
        assert_eq!(tessera_device_free(device), TesseraStatus::Ok);
    }
}

#[test]
fn an_adapter_set_in_use_elsewhere_is_busy_and_the_output_untouched() {
    use crate::lora::*;
    let device = cpu();
    // One adapter of rank 1 over a 2x2 base: y = x·wᵀ + 0.5·(x·aᵀ)·bᵀ.
    let a = tensor(device, &[1.0, 2.0], &[1, 1, 2]);
    let b = tensor(device, &[3.0, -1.0], &[1, 2, 1]);
    let w = tensor(device, &[1.0, 0.0, 0.0, 1.0], &[2, 2]);
    let x = tensor(device, &[1.0, 1.0], &[1, 2]);
    let out = tensor(device, &[9.0; 2], &[1, 2]);
    let (mut adapters, mut routing, mut base) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live handles and valid pointers for what the lengths say.
    unsafe {
        assert_eq!(
            tessera_lora_adapters_new(a, b, [1].as_ptr(), [0.5].as_ptr(), 1, &mut adapters),
            TesseraStatus::Ok
        );
        assert_eq!(
            tessera_lora_routing_new_single(device, 1, 0, &mut routing),
            TesseraStatus::Ok
        );
        assert_eq!(tessera_lora_base_new_dense(w, &mut base), TesseraStatus::Ok);
    }
    let shared = handle::lora_adapters("test", "adapters", adapters).unwrap();

    // Another call changing the set: the forward is refused and writes nothing.
    let writing = shared.write().unwrap();
    // SAFETY: live handles.
    let status = unsafe { tessera_lora_forward(x, base, std::ptr::null(), adapters, routing, out) };
    assert_eq!(status, TesseraStatus::Busy);
    assert!(
        last_error().contains("argument `adapters`: the adapter set"),
        "{}",
        last_error()
    );
    let mut back = [0f32; 2];
    // SAFETY: `back` holds 8 bytes.
    unsafe { tessera_tensor_copy_to_host(out, back.as_mut_ptr().cast(), 8) };
    assert_eq!(back, [9.0; 2]);
    drop(writing);

    // Another call writing the base's tensor: refused too.
    let base_tensor = handle::tensor("test", "w", w).unwrap();
    let writing = base_tensor.write().unwrap();
    // SAFETY: live handles.
    let status = unsafe { tessera_lora_forward(x, base, std::ptr::null(), adapters, routing, out) };
    assert_eq!(status, TesseraStatus::Busy);
    assert!(last_error().contains("argument `base`"), "{}", last_error());
    drop(writing);

    // x·aᵀ = 3; y = (1, 1) + 0.5·3·(3, -1) = (5.5, -0.5), exact in f32.
    // SAFETY: live handles; `back` holds 8 bytes; each handle is freed once.
    unsafe {
        assert_eq!(
            tessera_lora_forward(x, base, std::ptr::null(), adapters, routing, out),
            TesseraStatus::Ok,
            "{}",
            last_error()
        );
        tessera_tensor_copy_to_host(out, back.as_mut_ptr().cast(), 8);
        assert_eq!(back, [5.5, -0.5]);
        assert_eq!(tessera_lora_base_free(base), TesseraStatus::Ok);
        assert_eq!(tessera_lora_routing_free(routing), TesseraStatus::Ok);
        assert_eq!(tessera_lora_adapters_free(adapters), TesseraStatus::Ok);
        for t in [a, b, w, x, out] {
            assert_eq!(tessera_tensor_free(t), TesseraStatus::Ok);
        }
        assert_eq!(tessera_device_free(device), TesseraStatus::Ok);
    }
}
