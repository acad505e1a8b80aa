//! Per-layer linear variants: how each projection of a transformer block stores and trains its
//! weight (dense, N:M or unstructured static sparsity, sparse plus low-rank, binary), and an
//! optional LoRA adapter on top.
//!
//! A [`LinearVariants`] holds a default for every block linear layer and overrides chosen by
//! selectors; the last override that selects a layer wins. A selector is a layer kind (`q`, `k`,
//! `v`, `qkv` for GPT-2's fused `c_attn`, `out`, `gate`, `up`, `down`), a group (`attention`:
//! q, k, v, qkv, out; `mlp`: gate, up, down), or the end of a layer's Hugging Face name after a
//! dot (`q_proj`, `c_fc`, `attn.c_proj`, `h.0.mlp.c_proj`, `layers.3.self_attn.o_proj`). The
//! token embedding and the output projection always stay dense.
//!
//! In a configuration's JSON (and so in a checkpoint's metadata) the variants are the optional
//! field `linears`; without it every layer is dense:
//! ```text
//! "linears": {
//!   "default": {"variant": "unstructured", "density": 0.5, "seed": 7},
//!   "overrides": [
//!     {"select": "attention", "variant": "nm", "n": 2, "m": 4, "prune_step": 0,
//!      "lora": {"rank": 4, "alpha": 4.0, "frozen_base": false}}
//!   ]
//! }
//! ```

use super::config::GptConfig;
use crate::error::{Error, Result};
use crate::ops::NmPattern;
use serde_json::{json, Map, Value};

const OP: &str = "LinearVariants";

/// Which projection of a block a linear layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKind {
    Q,
    K,
    V,
    /// GPT-2's fused query-key-value projection, `c_attn`.
    Qkv,
    Out,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    /// The kind's selector name.
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::Q => "q",
            LinearKind::K => "k",
            LinearKind::V => "v",
            LinearKind::Qkv => "qkv",
            LinearKind::Out => "out",
            LinearKind::Gate => "gate",
            LinearKind::Up => "up",
            LinearKind::Down => "down",
        }
    }

    /// `attention` or `mlp`.
    pub fn group(self) -> &'static str {
        match self {
            LinearKind::Gate | LinearKind::Up | LinearKind::Down => "mlp",
            _ => "attention",
        }
    }
}

/// How a linear layer's weight is stored and trained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    /// An ordinary dense weight.
    Dense,
    /// SLoPe (ALGORITHMS.md §2): `n` of every `m` weights along the input dimension kept, chosen
    /// by magnitude once, at step `prune_step` (0: at initialisation), and fixed after; the
    /// input gradient goes through the double-pruned weight.
    Nm { n: usize, m: usize, prune_step: u64 },
    /// SPDF (ALGORITHMS.md §11): a fixed random mask keeping `round(density · numel)` weights,
    /// drawn from `seed` (mixed with the layer's name, so layers differ).
    Unstructured { density: f64, seed: u64 },
    /// SLTrain (ALGORITHMS.md §5): `W = (alpha/rank)·B·A + S`, S on a fixed random support of
    /// `density` of the entries, drawn from `seed` (mixed with the layer's name).
    SparseLowRank {
        rank: usize,
        density: f64,
        alpha: f32,
        seed: u64,
    },
    /// FBI-LLM (ALGORITHMS.md §1): `W~ = α·sign(W) + β`, straight-through backward.
    Binary,
}

impl Variant {
    /// The variant's name in configurations.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::Dense => "dense",
            Variant::Nm { .. } => "nm",
            Variant::Unstructured { .. } => "unstructured",
            Variant::SparseLowRank { .. } => "sparse_low_rank",
            Variant::Binary => "binary",
        }
    }

    /// True for the variants that keep a dense master weight beside a fixed mask.
    pub fn is_masked(&self) -> bool {
        matches!(self, Variant::Nm { .. } | Variant::Unstructured { .. })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Dense | Variant::Binary => write!(f, "{}", self.name()),
            Variant::Nm { n, m, prune_step } => write!(f, "nm {n}:{m} (pruned at step {prune_step})"),
            Variant::Unstructured { density, seed } => write!(f, "unstructured density {density} seed {seed}"),
            Variant::SparseLowRank {
                rank,
                density,
                alpha,
                seed,
            } => write!(
                f,
                "sparse_low_rank rank {rank} density {density} alpha {alpha} seed {seed}"
            ),
        }
    }
}

/// A LoRA adapter on a linear layer: `y += (alpha/rank)·(x·Aᵀ)·Bᵀ`, A (rank, in), B (out, rank).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    /// The layer's own weights stop training once the adapter is on.
    pub frozen_base: bool,
}

impl LoraSpec {
    /// The adapter's output scale, `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// One layer's variant and adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSpec {
    pub variant: Variant,
    pub lora: Option<LoraSpec>,
}

impl LinearSpec {
    pub const DENSE: LinearSpec = LinearSpec {
        variant: Variant::Dense,
        lora: None,
    };
}

impl std::fmt::Display for LinearSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.variant)?;
        if let Some(lora) = &self.lora {
            write!(
                f,
                " + lora rank {} alpha {}{}",
                lora.rank,
                lora.alpha,
                if lora.frozen_base { " (frozen base)" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// Every block linear layer's variant: a default and selector overrides (the last match wins).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearVariants {
    pub default: LinearSpec,
    pub overrides: Vec<(String, LinearSpec)>,
}

impl Default for LinearVariants {
    fn default() -> Self {
        LinearVariants::dense()
    }
}

/// One block linear layer as the selectors see it.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearSite {
    pub kind: LinearKind,
    /// The Hugging Face name without `.weight` (`transformer.h.0.attn.c_attn`).
    pub name: String,
    pub input: usize,
    pub output: usize,
}

impl LinearSite {
    fn selected_by(&self, selector: &str) -> bool {
        selector == self.kind.name()
            || selector == self.kind.group()
            || self.name.strip_suffix(selector).is_some_and(|head| head.ends_with('.'))
    }
}

impl LinearVariants {
    /// Every layer dense, as a configuration without `linears` says.
    pub fn dense() -> LinearVariants {
        LinearVariants {
            default: LinearSpec::DENSE,
            overrides: Vec::new(),
        }
    }

    /// Every layer `spec`.
    pub fn all(spec: LinearSpec) -> LinearVariants {
        LinearVariants {
            default: spec,
            overrides: Vec::new(),
        }
    }

    /// True when every layer is dense without an adapter whatever the selectors match.
    pub fn is_dense(&self) -> bool {
        self.default == LinearSpec::DENSE && self.overrides.iter().all(|(_, spec)| *spec == LinearSpec::DENSE)
    }

    /// The spec of `site`.
    pub fn spec_for(&self, site: &LinearSite) -> LinearSpec {
        self.overrides
            .iter()
            .rev()
            .find(|(selector, _)| site.selected_by(selector))
            .map_or(self.default, |(_, spec)| *spec)
    }

    /// Checks every selector selects a layer of `config` and every layer's spec fits its sizes.
    pub fn validate(&self, config: &GptConfig) -> Result<()> {
        let sites = super::params::linear_sites(config);
        for (selector, _) in &self.overrides {
            if !sites.iter().any(|site| site.selected_by(selector)) {
                return Err(Error::invalid(
                    OP,
                    "overrides.select",
                    "a layer kind (q, k, v, qkv, out, gate, up, down), a group (attention, mlp) or the end \
                     of a block layer's name (q_proj, c_fc, attn.c_proj, h.0.mlp.c_proj, ...) that selects a layer",
                    format!("`{selector}`"),
                ));
            }
        }
        for site in &sites {
            check_spec(&self.spec_for(site), site)?;
        }
        Ok(())
    }

    /// The `linears` JSON object, or `None` when every layer is dense (so that dense
    /// configurations keep their JSON unchanged).
    pub fn to_json(&self) -> Option<Value> {
        if self.is_dense() {
            return None;
        }
        let overrides: Vec<Value> = self
            .overrides
            .iter()
            .map(|(selector, spec)| {
                let mut object = spec_json(spec);
                object.insert("select".into(), json!(selector));
                Value::Object(object)
            })
            .collect();
        Some(json!({ "default": Value::Object(spec_json(&self.default)), "overrides": overrides }))
    }

    /// Parses [`LinearVariants::to_json`]'s object (as a TOML `[model.linears]` table gives it
    /// too). `default` may be left out (dense), and so may `overrides` (none).
    pub fn from_json(value: &Value) -> Result<LinearVariants> {
        let object = value
            .as_object()
            .ok_or_else(|| Error::invalid(OP, "linears", "an object with `default` and `overrides`", value))?;
        if let Some(key) = object.keys().find(|k| *k != "default" && *k != "overrides") {
            return Err(Error::invalid(
                OP,
                "linears",
                "only `default` and `overrides`",
                format!("`{key}`"),
            ));
        }
        let default = match object.get("default") {
            None => LinearSpec::DENSE,
            Some(v) => parse_spec(v, false)?.1,
        };
        let overrides = match object.get("overrides") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| parse_spec(v, true).map(|(s, spec)| (s.unwrap_or_default(), spec)))
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::invalid(OP, "overrides", "an array of layer specs", other));
            }
        };
        Ok(LinearVariants { default, overrides })
    }
}

fn spec_json(spec: &LinearSpec) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("variant".into(), json!(spec.variant.name()));
    match spec.variant {
        Variant::Dense | Variant::Binary => {}
        Variant::Nm { n, m, prune_step } => {
            object.insert("n".into(), json!(n));
            object.insert("m".into(), json!(m));
            object.insert("prune_step".into(), json!(prune_step));
        }
        Variant::Unstructured { density, seed } => {
            object.insert("density".into(), json!(density));
            object.insert("seed".into(), json!(seed));
        }
        Variant::SparseLowRank {
            rank,
            density,
            alpha,
            seed,
        } => {
            object.insert("rank".into(), json!(rank));
            object.insert("density".into(), json!(density));
            object.insert("alpha".into(), json!(alpha));
            object.insert("seed".into(), json!(seed));
        }
    }
    if let Some(lora) = &spec.lora {
        object.insert(
            "lora".into(),
            json!({ "rank": lora.rank, "alpha": lora.alpha, "frozen_base": lora.frozen_base }),
        );
    }
    object
}

/// One spec object; with `selected`, its `select` too.
fn parse_spec(value: &Value, selected: bool) -> Result<(Option<String>, LinearSpec)> {
    let object = value
        .as_object()
        .ok_or_else(|| Error::invalid(OP, "linears", "a layer spec object", value))?;
    let get = |key: &'static str| {
        object
            .get(key)
            .ok_or_else(|| Error::invalid(OP, key, "a value", "nothing"))
    };
    let size = |key: &'static str| -> Result<usize> {
        let v = get(key)?;
        v.as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::invalid(OP, key, "a non-negative integer", v))
    };
    let number = |key: &'static str| -> Result<f64> {
        let v = get(key)?;
        v.as_f64().ok_or_else(|| Error::invalid(OP, key, "a number", v))
    };
    let optional_u64 = |key: &'static str| -> Result<u64> {
        match object.get(key) {
            None => Ok(0),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| Error::invalid(OP, key, "a non-negative integer", v)),
        }
    };
    let variant_name = get("variant")?;
    let (variant, fields): (Variant, &[&str]) = match variant_name.as_str() {
        Some("dense") => (Variant::Dense, &[]),
        Some("nm") => (
            Variant::Nm {
                n: size("n")?,
                m: size("m")?,
                prune_step: optional_u64("prune_step")?,
            },
            &["n", "m", "prune_step"],
        ),
        Some("unstructured") => (
            Variant::Unstructured {
                density: number("density")?,
                seed: optional_u64("seed")?,
            },
            &["density", "seed"],
        ),
        Some("sparse_low_rank") => (
            Variant::SparseLowRank {
                rank: size("rank")?,
                density: number("density")?,
                alpha: number("alpha")? as f32,
                seed: optional_u64("seed")?,
            },
            &["rank", "density", "alpha", "seed"],
        ),
        Some("binary") => (Variant::Binary, &[]),
        _ => {
            return Err(Error::invalid(
                OP,
                "variant",
                "one of \"dense\", \"nm\", \"unstructured\", \"sparse_low_rank\", \"binary\"",
                variant_name,
            ))
        }
    };
    let allowed =
        |key: &str| key == "variant" || key == "lora" || (selected && key == "select") || fields.contains(&key);
    if let Some(key) = object.keys().find(|k| !allowed(k)) {
        return Err(Error::invalid(
            OP,
            "linears",
            format!("the fields of a `{}` layer spec", variant.name()),
            format!("`{key}`"),
        ));
    }
    let lora = match object.get("lora") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_lora(v)?),
    };
    let select = if selected {
        let v = get("select")?;
        Some(
            v.as_str()
                .ok_or_else(|| Error::invalid(OP, "select", "a selector string", v))?
                .to_string(),
        )
    } else {
        None
    };
    Ok((select, LinearSpec { variant, lora }))
}

fn parse_lora(value: &Value) -> Result<LoraSpec> {
    let object = value
        .as_object()
        .ok_or_else(|| Error::invalid(OP, "lora", "{\"rank\": r, \"alpha\": a, \"frozen_base\": bool}", value))?;
    if let Some(key) = object
        .keys()
        .find(|k| !["rank", "alpha", "frozen_base"].contains(&k.as_str()))
    {
        return Err(Error::invalid(
            OP,
            "lora",
            "only rank, alpha and frozen_base",
            format!("`{key}`"),
        ));
    }
    let rank = object.get("rank").and_then(Value::as_u64);
    let alpha = object.get("alpha").and_then(Value::as_f64);
    let frozen = match object.get("frozen_base") {
        None => Some(false),
        Some(v) => v.as_bool(),
    };
    match (rank, alpha, frozen) {
        (Some(rank), Some(alpha), Some(frozen_base)) => Ok(LoraSpec {
            rank: rank as usize,
            alpha: alpha as f32,
            frozen_base,
        }),
        _ => Err(Error::invalid(
            OP,
            "lora",
            "{\"rank\": integer, \"alpha\": number, \"frozen_base\": bool (optional)}",
            value,
        )),
    }
}

/// Checks `spec` against the layer's sizes.
fn check_spec(spec: &LinearSpec, site: &LinearSite) -> Result<()> {
    let at = |what: String| format!("{what} for {} ({} -> {})", site.name, site.input, site.output);
    let fraction = |arg: &'static str, density: f64| {
        if density > 0.0 && density <= 1.0 {
            Ok(())
        } else {
            Err(Error::invalid(OP, arg, at("a density in (0, 1]".into()), density))
        }
    };
    match spec.variant {
        Variant::Dense | Variant::Binary => {}
        Variant::Nm { n, m, .. } => {
            NmPattern::new(n, m)?;
            // Groups run along the input dimension (the forward's reduction) and, for the
            // double-pruned input gradient, along the output dimension too.
            for size in [site.input, site.output] {
                if !size.is_multiple_of(m) {
                    return Err(Error::invalid(
                        OP,
                        "nm.m",
                        at("a group size dividing both the input and output widths".into()),
                        m,
                    ));
                }
            }
        }
        Variant::Unstructured { density, .. } => fraction("unstructured.density", density)?,
        Variant::SparseLowRank {
            rank, density, alpha, ..
        } => {
            fraction("sparse_low_rank.density", density)?;
            if rank == 0 || rank > site.input.min(site.output) {
                return Err(Error::invalid(
                    OP,
                    "sparse_low_rank.rank",
                    at("a rank between 1 and min(input, output)".into()),
                    rank,
                ));
            }
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(Error::invalid(
                    OP,
                    "sparse_low_rank.alpha",
                    "a finite number > 0",
                    alpha,
                ));
            }
        }
    }
    if let Some(lora) = &spec.lora {
        // The lora op's kernels (and its lazy initialisation) take ranks up to MAX_RANK.
        let most = site.input.min(site.output).min(crate::ops::lora::MAX_RANK);
        if lora.rank == 0 || lora.rank > most {
            return Err(Error::invalid(
                OP,
                "lora.rank",
                at(format!(
                    "a rank between 1 and min(input, output, {})",
                    crate::ops::lora::MAX_RANK
                )),
                lora.rank,
            ));
        }
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return Err(Error::invalid(OP, "lora.alpha", "a finite number > 0", lora.alpha));
        }
    }
    Ok(())
}
