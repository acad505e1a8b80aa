//! copy_columns: GPT-2 small's fused query-key-value output (16k tokens, 3 x 768 bf16 columns)
//! split into its three parts, against the copy ceiling.

use super::{input_sets, random_tensor, Context, Result};
use serde_json::{json, Value};
use tessera::ops;
use tessera::{DType, Tensor};

pub fn run(context: &mut Context) -> Result<Vec<Value>> {
    let (rows, part) = if context.quick { (1024, 768) } else { (16384, 768) };
    let device = &context.device;
    let bytes = rows * 3 * part * 2;
    let sets = input_sets(bytes);
    let inputs: Vec<Tensor> = (0..sets as u64)
        .map(|s| random_tensor(&[rows, 3 * part], DType::BF16, 700 + s, -1.0, 1.0, device))
        .collect::<Result<_>>()?;
    let mut parts: Vec<Tensor> = (0..3)
        .map(|_| Tensor::zeros(&[rows, part], DType::BF16, device).map_err(|e| e.to_string()))
        .collect::<Result<_>>()?;
    let ms = context.median_ms(|i| {
        for (index, out) in parts.iter_mut().enumerate() {
            ops::copy_columns(&inputs[i % sets], index * part, out, 0, part)?;
        }
        Ok(())
    })?;
    let gbps = (2 * bytes) as f64 / (ms * 1e6);
    Ok(vec![json!({
        "name": format!("copy_columns split {rows}x(3x{part}) bf16"),
        "kind": "columns",
        "rows": rows,
        "part": part,
        "input_sets": sets,
        "ms": ms,
        "gbps": gbps,
        "pct_of_copy": context.pct_of_copy(gbps),
    })])
}
