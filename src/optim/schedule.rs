//! Learning-rate schedules.

use crate::error::{Error, Result};

/// Linear warm-up from 0 to `peak` over `warmup` steps, then a cosine decay to `min` at `total`
/// steps, flat after that (GPT-2 and Llama recipes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    pub peak: f32,
    pub min: f32,
    pub warmup: u64,
    pub total: u64,
}

impl WarmupCosine {
    pub fn new(peak: f32, min: f32, warmup: u64, total: u64) -> Result<WarmupCosine> {
        const OP: &str = "WarmupCosine";
        if !(peak.is_finite() && peak > 0.0) {
            return Err(Error::invalid(OP, "peak", "a finite learning rate > 0", peak));
        }
        if !(min.is_finite() && (0.0..=peak).contains(&min)) {
            return Err(Error::invalid(
                OP,
                "min",
                format!("a learning rate in [0, peak = {peak}]"),
                min,
            ));
        }
        if warmup > total {
            return Err(Error::invalid(
                OP,
                "warmup",
                format!("at most total ({total}) steps"),
                warmup,
            ));
        }
        Ok(WarmupCosine {
            peak,
            min,
            warmup,
            total,
        })
    }

    /// The learning rate of the 1-based `step`.
    pub fn lr(&self, step: u64) -> f32 {
        if step <= self.warmup {
            return self.peak * step as f32 / self.warmup.max(1) as f32;
        }
        if step >= self.total {
            return self.min;
        }
        let progress = (step - self.warmup) as f64 / (self.total - self.warmup) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min as f64 + (self.peak - self.min) as f64 * cosine) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_minimum() {
        let schedule = WarmupCosine::new(1e-3, 1e-4, 10, 110).unwrap();
        assert_eq!(schedule.lr(5), 5e-4);
        assert_eq!(schedule.lr(10), 1e-3);
        assert!((schedule.lr(60) - 5.5e-4).abs() < 1e-9);
        assert_eq!(schedule.lr(110), 1e-4);
        assert_eq!(schedule.lr(1000), 1e-4);
        assert!((1..110).all(|s| schedule.lr(s + 1) <= schedule.lr(s) || s < 10));
        assert!(WarmupCosine::new(1e-3, 1e-2, 0, 10).is_err());
        assert!(WarmupCosine::new(1e-3, 0.0, 20, 10).is_err());
    }
}
