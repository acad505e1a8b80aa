//! Token and position embeddings (src/ops/embedding.rs) on every device and dtype: the forward
//! bit for bit against the f32 sum rounded once, the backward against an f64 reference and bit
//! for bit against f32 sums in position order (the documented order, the same on both devices),
//! with and without the position table, overwriting and accumulating; frequent tokens (long
//! groups) and sparse ones; plan updates; and the argument errors.

#[macro_use]
mod common;

use common::{assert_close_at_scale, assert_invalid, bytes, norm, uniform, values, Float};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use tessera::ops::{embedding_backward_into, embedding_forward, embedding_forward_into, EmbeddingGradPlan};
use tessera::{DType, Device, Tensor};

on_each_device!(
    small_embedding,
    forward_and_backward_all_dtypes,
    frequent_tokens,
    accumulate_and_update,
    out_of_range_tokens,
    errors_name_the_argument,
);

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let mut t = Tensor::zeros(shape, dtype, device).unwrap();
    t.fill_bytes(0xFF).unwrap();
    t
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    seq: usize,
    vocab: usize,
    width: usize,
    positions: bool,
}

fn check<T: Float>(device: &Device, rng: &mut StdRng, c: Case) {
    let Case {
        batch,
        seq,
        vocab,
        width,
        ..
    } = c;
    let count = batch * seq;
    let context = seq + 3;
    let tokens: Vec<u32> = (0..count).map(|_| rng.random_range(0..vocab as u32)).collect();
    let wte: Vec<T> = uniform(rng, vocab * width);
    let wpe: Vec<T> = uniform(rng, context * width);
    let d_out: Vec<T> = uniform(rng, count * width);
    let tokens_t = Tensor::from_slice(&tokens, &[batch, seq], device).unwrap();
    let wte_t = Tensor::from_slice(&wte, &[vocab, width], device).unwrap();
    let wpe_t = Tensor::from_slice(&wpe, &[context, width], device).unwrap();
    let wpe_arg = c.positions.then_some(&wpe_t);
    let what = format!("{} {c:?}", T::DTYPE);

    let mut out = poisoned(&[batch, seq, width], T::DTYPE, device);
    embedding_forward_into(&tokens_t, &wte_t, wpe_arg, &mut out).unwrap();
    let expected: Vec<T> = (0..count * width)
        .map(|i| {
            let (n, col) = (i / width, i % width);
            let e = wte[tokens[n] as usize * width + col].to_f64() as f32;
            let p = if c.positions {
                wpe[(n % seq) * width + col].to_f64() as f32
            } else {
                0.0
            };
            T::from_f32(e + p)
        })
        .collect();
    assert!(
        bytes(&out) == bytes(&Tensor::from_slice(&expected, &[batch, seq, width], &Device::Cpu).unwrap()),
        "forward {what}: not the f32 sum rounded once"
    );

    let plan = EmbeddingGradPlan::new(&tokens, batch, seq, vocab, device).unwrap();
    let distinct = {
        let mut seen = tokens.clone();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    assert_eq!(plan.distinct_tokens(), distinct);
    let d_out_t = Tensor::from_slice(&d_out, &[batch, seq, width], device).unwrap();
    let mut d_wte = poisoned(&[vocab, width], DType::F32, device);
    let mut d_wpe = poisoned(&[context, width], DType::F32, device);
    embedding_backward_into(&d_out_t, &plan, &mut d_wte, c.positions.then_some(&mut d_wpe), false).unwrap();
    // f64 reference and the documented f32 order (positions ascending, batches ascending).
    let (mut ref_wte, mut f32_wte, mut abs_wte) = (
        vec![0.0f64; vocab * width],
        vec![0.0f32; vocab * width],
        vec![0.0; vocab * width],
    );
    for (n, &t) in tokens.iter().enumerate() {
        for col in 0..width {
            let g = d_out[n * width + col].to_f64();
            ref_wte[t as usize * width + col] += g;
            abs_wte[t as usize * width + col] += g.abs();
            f32_wte[t as usize * width + col] += g as f32;
        }
    }
    let got = values::<f32>(&d_wte);
    assert_close_at_scale(&format!("d_wte {what}"), &got, &ref_wte, 1e-6, norm(abs_wte));
    assert_eq!(
        d_wte.to_vec::<f32>().unwrap(),
        f32_wte,
        "d_wte {what}: not the sums in position order"
    );
    if c.positions {
        let mut f32_wpe = vec![0.0f32; context * width];
        for b in 0..batch {
            for i in 0..seq * width {
                f32_wpe[i] += d_out[b * seq * width + i].to_f64() as f32;
            }
        }
        assert_eq!(
            d_wpe.to_vec::<f32>().unwrap(),
            f32_wpe,
            "d_wpe {what}: not the sums in batch order"
        );
    } else {
        assert!(
            values::<f32>(&d_wpe).iter().all(|v| v.is_nan()),
            "d_wpe was written without being asked for"
        );
    }
}

fn case(batch: usize, seq: usize, vocab: usize, width: usize) -> Case {
    Case {
        batch,
        seq,
        vocab,
        width,
        positions: true,
    }
}

/// The kernels' smallest cases, for compute-sanitizer: the vector and one-element forwards, both
/// backward kernels.
fn small_embedding(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(device, &mut rng, case(2, 5, 11, 16));
    check::<f32>(device, &mut rng, case(1, 3, 4, 7));
}

fn forward_and_backward_all_dtypes(device: &Device) {
    let mut rng = common::rng();
    for c in [
        case(1, 1, 1, 1),
        case(3, 7, 50, 17),
        case(2, 17, 1000, 113),
        case(4, 33, 300, 768),
        case(2, 9, 20, 1025),
    ] {
        for positions in [true, false] {
            let c = Case { positions, ..c };
            check::<f32>(device, &mut rng, c);
            check::<bf16>(device, &mut rng, c);
            check::<f16>(device, &mut rng, c);
        }
    }
    check::<bf16>(device, &mut rng, case(2, 64, 50304, 64));
}

/// A tiny vocabulary over many positions: groups of hundreds, through the kernel's unrolled
/// loop and its tail.
fn frequent_tokens(device: &Device) {
    let mut rng = common::rng();
    check::<bf16>(device, &mut rng, case(8, 257, 3, 40));
    check::<f32>(device, &mut rng, case(3, 101, 2, 9));
}

/// With `accumulate`, gradients add to what the tables hold; an updated plan describes the new
/// batch.
fn accumulate_and_update(device: &Device) {
    let mut rng = common::rng();
    let (batch, seq, vocab, width) = (2, 6, 9, 8);
    let first: Vec<u32> = (0..batch * seq).map(|_| rng.random_range(0..vocab as u32)).collect();
    let second: Vec<u32> = (0..batch * seq).map(|_| rng.random_range(0..vocab as u32)).collect();
    let d_out: Vec<f32> = uniform(&mut rng, batch * seq * width);
    let d_out_t = Tensor::from_slice(&d_out, &[batch, seq, width], device).unwrap();
    let mut plan = EmbeddingGradPlan::new(&first, batch, seq, vocab, device).unwrap();
    let mut d_wte = Tensor::from_vec(vec![0.5f32; vocab * width], &[vocab, width], device).unwrap();
    let mut d_wpe = Tensor::from_vec(vec![0.25f32; seq * width], &[seq, width], device).unwrap();
    embedding_backward_into(&d_out_t, &plan, &mut d_wte, Some(&mut d_wpe), true).unwrap();
    plan.update(&second).unwrap();
    embedding_backward_into(&d_out_t, &plan, &mut d_wte, Some(&mut d_wpe), true).unwrap();
    let mut expected = vec![0.5f32; vocab * width];
    for tokens in [&first, &second] {
        let mut sums = vec![0.0f32; vocab * width];
        for (n, &t) in tokens.iter().enumerate() {
            for col in 0..width {
                sums[t as usize * width + col] += d_out[n * width + col];
            }
        }
        for (e, s) in expected.iter_mut().zip(&sums) {
            *e += s;
        }
    }
    assert_eq!(d_wte.to_vec::<f32>().unwrap(), expected);
    let mut wpe_sum = vec![0.0f32; seq * width];
    for b in 0..batch {
        for i in 0..seq * width {
            wpe_sum[i] += d_out[b * seq * width + i];
        }
    }
    let expected: Vec<f32> = wpe_sum.iter().map(|s| 0.25 + s + s).collect();
    assert_eq!(d_wpe.to_vec::<f32>().unwrap(), expected);
    // A plan update with the wrong length is refused and leaves the plan as it was.
    assert_invalid(
        plan.update(&second[1..]),
        "EmbeddingGradPlan::update",
        "tokens",
        &["12 tokens", "11 tokens"],
    );
    assert_eq!(plan.shape(), (batch, seq, vocab));
}

/// A token beyond the vocabulary: an error on the CPU (nothing written), a NaN row on a GPU
/// (documented); the plan refuses it on both.
fn out_of_range_tokens(device: &Device) {
    let tokens = Tensor::from_vec(vec![1u32, 4], &[1, 2], device).unwrap();
    let wte = Tensor::from_vec(vec![1.0f32; 4 * 3], &[4, 3], device).unwrap();
    let mut out = poisoned(&[1, 2, 3], DType::F32, device);
    let result = embedding_forward_into(&tokens, &wte, None, &mut out);
    let out = out.to_vec::<f32>().unwrap();
    if device.is_cuda() {
        result.unwrap();
        assert_eq!(&out[..3], &[1.0, 1.0, 1.0]);
        assert!(out[3..].iter().all(|v| v.is_nan()));
    } else {
        assert_invalid(
            result,
            "embedding_forward",
            "tokens",
            &["4 at index 1", "vocabulary size 4"],
        );
        assert!(out.iter().all(|v| v.is_nan()), "the output was written");
    }
    assert_invalid(
        EmbeddingGradPlan::new(&[1, 4], 1, 2, 4, device),
        "EmbeddingGradPlan::new",
        "tokens",
        &["4 at index 1"],
    );
}

fn errors_name_the_argument(device: &Device) {
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, device).unwrap();
    let tokens = zeros(&[2, 3], DType::U32);
    let wte = zeros(&[5, 8], DType::BF16);
    assert_invalid(
        embedding_forward(&zeros(&[2, 3], DType::F32), &wte, None),
        "embedding_forward",
        "tokens",
        &["u32"],
    );
    assert_invalid(
        embedding_forward(&zeros(&[6], DType::U32), &wte, None),
        "embedding_forward",
        "tokens",
        &["2-d"],
    );
    let short = zeros(&[2, 8], DType::BF16);
    assert_invalid(
        embedding_forward(&tokens, &wte, Some(&short)),
        "embedding_forward",
        "wpe",
        &["context >= 3"],
    );
    let f32_wpe = zeros(&[3, 8], DType::F32);
    assert_invalid(
        embedding_forward(&tokens, &wte, Some(&f32_wpe)),
        "embedding_forward",
        "wpe",
        &["bf16"],
    );
    let mut out = zeros(&[2, 3, 7], DType::BF16);
    assert_invalid(
        embedding_forward_into(&tokens, &wte, None, &mut out),
        "embedding_forward",
        "out",
        &["[2, 3, 8]"],
    );
    let plan = EmbeddingGradPlan::new(&[0, 1, 2, 3, 4, 0], 2, 3, 5, device).unwrap();
    let mut d_wte = zeros(&[5, 8], DType::BF16);
    let d_out = zeros(&[2, 3, 8], DType::BF16);
    assert_invalid(
        embedding_backward_into(&d_out, &plan, &mut d_wte, None, false),
        "embedding_backward",
        "d_wte",
        &["f32"],
    );
    let mut d_wte = zeros(&[5, 8], DType::F32);
    let wrong = zeros(&[3, 2, 8], DType::BF16);
    assert_invalid(
        embedding_backward_into(&wrong, &plan, &mut d_wte, None, false),
        "embedding_backward",
        "d_out",
        &["(2, 3, width)"],
    );
    let mut d_wpe = zeros(&[2, 8], DType::F32);
    d_wte.fill_bytes(0x11).unwrap();
    assert_invalid(
        embedding_backward_into(&d_out, &plan, &mut d_wte, Some(&mut d_wpe), false),
        "embedding_backward",
        "d_wpe",
        &["context >= 3"],
    );
    assert!(bytes(&d_wte).iter().all(|&b| b == 0x11), "a failed call wrote d_wte");
    assert_invalid(
        EmbeddingGradPlan::new(&[0; 6], 2, 3, 0, device),
        "EmbeddingGradPlan::new",
        "vocab",
        &["between 1"],
    );
}
