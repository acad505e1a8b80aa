//! Fast Forward (src/optim/fast_forward.rs, ALGORITHMS.md §7) on every device: Δ is the last
//! AdamW update and optimizer state is untouched, the number of repeated steps on a convex
//! quadratic is the discrete line-search optimum (one more in reference-compat mode), stages run
//! every `interval` steps after the burn-in, and bad configurations or parameter lists are errors.

#[macro_use]
mod common;

use common::{assert_invalid, bytes};
use tessera::ops::{adamw_step, AdamWConfig, AdamWTensor};
use tessera::optim::{FastForward, FastForwardConfig};
use tessera::{DType, Device, Tensor};

on_each_device!(
    delta_is_the_last_adamw_update,
    quadratic_line_search,
    stages_follow_the_schedule,
    errors_name_the_argument,
);

fn config(interval: usize, burn_in: usize, reference_compat: bool) -> FastForwardConfig {
    FastForwardConfig {
        interval,
        burn_in,
        reference_compat,
        max_steps: 100,
    }
}

fn delta_is_the_last_adamw_update(device: &Device) {
    let mut rng = common::rng();
    let values: Vec<f32> = common::uniform(&mut rng, 37);
    let grad: Vec<f32> = common::uniform(&mut rng, 37);
    let mut param = Tensor::from_vec(values, &[37], device).unwrap();
    let grad = Tensor::from_vec(grad, &[37], device).unwrap();
    let mut exp_avg = Tensor::zeros(&[37], DType::F32, device).unwrap();
    let mut exp_avg_sq = Tensor::zeros(&[37], DType::F32, device).unwrap();
    let adam = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut ff = FastForward::new(config(2, 0, false)).unwrap();
    let mut before_last = Vec::new();
    let mut seen: Vec<Vec<f32>> = Vec::new();
    for step in 1..=2u64 {
        before_last = param.to_vec::<f32>().unwrap();
        let mut list = [AdamWTensor {
            param: &mut param,
            grad: &grad,
            exp_avg: &mut exp_avg,
            exp_avg_sq: &mut exp_avg_sq,
            param_bf16: None,
            weight_decay: true,
        }];
        adamw_step(&mut list, &adam, step, 1.0).unwrap();
        let state = (bytes(&exp_avg), bytes(&exp_avg_sq));
        let stage = ff
            .after_step(&mut [&mut param], |p| {
                seen.push(p[0].to_vec::<f32>().unwrap());
                // Improving for two repeated steps, then worse.
                Ok([3.0, 2.0, 1.0, 5.0][seen.len() - 1])
            })
            .unwrap();
        assert_eq!(stage.is_some(), step == 2);
        assert_eq!(
            (bytes(&exp_avg), bytes(&exp_avg_sq)),
            state,
            "Fast Forward touched optimizer state"
        );
    }
    // seen[0] is P_t, seen[1] = P_t + Δ with Δ = P_t − P_{t−1}: the AdamW update of step 2.
    let (p_t, p_prev) = (&seen[0], &before_last);
    for i in 0..37 {
        let delta = p_t[i] - p_prev[i];
        assert_ne!(delta, 0.0);
        assert_eq!(seen[1][i], p_t[i] + delta, "element {i}");
    }
    // Two improving steps kept, the third (worse) undone.
    let expected: Vec<f32> = (0..37)
        .map(|i| (p_t[i] + (p_t[i] - p_prev[i])) + (p_t[i] - p_prev[i]))
        .collect();
    assert_eq!(param.to_vec::<f32>().unwrap(), expected);
}

/// Parameters 0 -> 1 (Δ = 1) with the loss `Σ (p − 7.3)²`: the loss falls until p = 7, so the
/// line-search optimum is 6 repeated steps (all values exact in f32); reference-compat mode keeps
/// the seventh, which made the loss worse.
fn quadratic_line_search(device: &Device) {
    for (compat, expected_steps) in [(false, 6usize), (true, 7)] {
        let mut a = Tensor::zeros(&[3, 5], DType::F32, device).unwrap();
        let mut b = Tensor::zeros(&[4], DType::F32, device).unwrap();
        let frozen = Tensor::from_vec(vec![0.5f32; 8], &[8], device).unwrap();
        let frozen_bytes = bytes(&frozen);
        let mut ff = FastForward::new(config(2, 3, compat)).unwrap();
        let loss = |p: &[&mut Tensor]| -> tessera::Result<f32> {
            let mut sum = 0.0f64;
            for t in p {
                sum += t
                    .to_vec::<f32>()?
                    .iter()
                    .map(|&v| (v as f64 - 7.3).powi(2))
                    .sum::<f64>();
            }
            Ok(sum as f32)
        };
        let mut stages = Vec::new();
        for step in 1..=5 {
            // An "optimizer" that moves every parameter to 1 on the last step.
            let value = if step == 5 { 1.0f32 } else { 0.0 };
            a.copy_from(&Tensor::from_vec(vec![value; 15], &[3, 5], device).unwrap())
                .unwrap();
            b.copy_from(&Tensor::from_vec(vec![value; 4], &[4], device).unwrap())
                .unwrap();
            if let Some(stage) = ff.after_step(&mut [&mut a, &mut b], loss).unwrap() {
                stages.push(stage);
            }
        }
        assert_eq!(stages.len(), 1, "compat={compat}");
        let stage = &stages[0];
        assert_eq!(stage.after_step, 5);
        assert_eq!(
            stage.steps_applied, expected_steps,
            "compat={compat}: losses {:?}",
            stage.losses
        );
        let final_value = 1.0 + expected_steps as f32;
        assert!(a.to_vec::<f32>().unwrap().iter().all(|&v| v == final_value));
        assert!(b.to_vec::<f32>().unwrap().iter().all(|&v| v == final_value));
        assert_eq!(bytes(&frozen), frozen_bytes);
        // Default mode evaluates the pre-stage loss and one step past the optimum.
        assert_eq!(stage.losses.len(), if compat { 7 } else { 8 });
    }
}

fn stages_follow_the_schedule(device: &Device) {
    let mut p = Tensor::zeros(&[2], DType::F32, device).unwrap();
    let mut ff = FastForward::new(config(6, 5, false)).unwrap();
    let mut stages = Vec::new();
    for step in 1..=30 {
        p.copy_from(&Tensor::from_vec(vec![step as f32; 2], &[2], device).unwrap())
            .unwrap();
        // A loss that any move makes worse: every stage undoes its one step.
        let mut calls = 0;
        let stage = ff
            .after_step(&mut [&mut p], |_| {
                calls += 1;
                Ok(calls as f32)
            })
            .unwrap();
        if let Some(stage) = stage {
            assert_eq!(stage.steps_applied, 0);
            assert_eq!(
                p.to_vec::<f32>().unwrap(),
                vec![step as f32; 2],
                "a worse step was not undone"
            );
            stages.push(stage.after_step);
        }
    }
    assert_eq!(stages, vec![11, 17, 23, 29]);
}

fn errors_name_the_argument(device: &Device) {
    assert_invalid(
        FastForward::new(config(1, 0, false)),
        "FastForward",
        "config.interval",
        &["at least 2"],
    );
    let mut ff = FastForward::new(config(2, 0, false)).unwrap();
    let mut half = Tensor::zeros(&[2], DType::BF16, device).unwrap();
    assert_invalid(
        ff.after_step(&mut [&mut half], |_| Ok(0.0)),
        "FastForward",
        "params",
        &["f32"],
    );
    let mut ff = FastForward::new(config(2, 0, false)).unwrap();
    let mut a = Tensor::zeros(&[2], DType::F32, device).unwrap();
    let mut b = Tensor::zeros(&[3], DType::F32, device).unwrap();
    assert!(ff.after_step(&mut [&mut a], |_| Ok(0.0)).unwrap().is_none());
    assert_invalid(
        ff.after_step(&mut [&mut a, &mut b], |_| Ok(0.0)),
        "FastForward",
        "params",
        &["same parameter list"],
    );
}
