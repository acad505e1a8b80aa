//! A training run's configuration: a preset with a TOML document's `[model]` and `[train]`
//! tables laid over it, field by field.

use super::trainer::TrainOptions;
use crate::error::{Error, Result};
use crate::model::params::parse_config_json;
use crate::model::{GptConfig, LinearVariants};
use serde_json::Value;

const OP: &str = "train configuration";

/// The preset's model and training options (`gpt2-small`'s recipe for `gpt2-small`, the tiny
/// one otherwise), with the fields `toml` sets in its `[model]` and `[train]` tables replaced.
/// An unknown table or field, or a value of the wrong type, is an error naming it. A `[model]`
/// table with non-dense `linears` is an error here: [`run_configuration`] returns them.
pub fn configuration(preset: &str, toml: Option<&str>) -> Result<(GptConfig, TrainOptions)> {
    let (config, variants, options) = run_configuration(preset, toml)?;
    if !variants.is_dense() {
        return Err(Error::invalid(
            OP,
            "toml",
            "dense linear layers (read the variants with run_configuration)",
            "[model.linears] with non-dense layers",
        ));
    }
    Ok((config, options))
}

/// [`configuration`] with the block linear layers' variants, from the `[model.linears]` table
/// (its `default` table and `[[model.linears.overrides]]` array, as in
/// [`crate::model::variants`]; all dense without it).
pub fn run_configuration(preset: &str, toml: Option<&str>) -> Result<(GptConfig, LinearVariants, TrainOptions)> {
    let config = GptConfig::preset(preset)?;
    let options = match preset {
        "gpt2-small" => TrainOptions::gpt2_small(),
        _ => TrainOptions::tiny(),
    };
    let Some(text) = toml else {
        return Ok((config, LinearVariants::dense(), options));
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| Error::invalid(OP, "toml", "a TOML document", e))?;
    let mut model: Value =
        serde_json::from_str(&config.to_json()).map_err(|e| Error::invalid(OP, "preset", "JSON", e))?;
    let mut train = options.to_json();
    for (key, value) in &table {
        let target = match key.as_str() {
            "model" => &mut model,
            "train" => &mut train,
            other => {
                return Err(Error::invalid(
                    OP,
                    "toml",
                    "only the tables [model] and [train]",
                    format!("[{other}]"),
                ))
            }
        };
        let toml::Value::Table(fields) = value else {
            return Err(Error::invalid(
                OP,
                "toml",
                format!("`{key}` to be a table"),
                value.type_str(),
            ));
        };
        for (field, value) in fields {
            if target.get(field).is_none() && !(key == "model" && field == "linears") {
                return Err(Error::invalid(
                    OP,
                    "toml",
                    format!("a field of [{key}]"),
                    format!("unknown field `{field}`"),
                ));
            }
            target[field] = serde_json::to_value(value).map_err(|e| Error::invalid(OP, "toml", field, e))?;
        }
    }
    let (config, variants) = parse_config_json(&model.to_string())?;
    let options = TrainOptions::from_json(&train)
        .ok_or_else(|| Error::invalid(OP, "toml", "[train] fields of the right types", "a mistyped field"))?;
    Ok((config, variants, options))
}
