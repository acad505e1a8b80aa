//! A training run's configuration: a preset with a TOML document's `[model]` and `[train]`
//! tables laid over it, and every way such a document can be wrong.

use tessera::model::{Attention, GptConfig, Positions};
use tessera::train::config::configuration;
use tessera::train::trainer::TrainOptions;
use tessera::Error;

fn invalid(result: tessera::Result<(GptConfig, TrainOptions)>, mentions: &[&str]) {
    match result {
        Err(error @ Error::InvalidArgument { .. }) => {
            let text = error.to_string();
            for word in mentions {
                assert!(text.contains(word), "`{text}` does not mention `{word}`");
            }
        }
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

#[test]
fn without_toml_the_preset_is_unchanged() {
    assert_eq!(
        configuration("tiny", None).unwrap(),
        (GptConfig::tiny(), TrainOptions::tiny())
    );
    assert_eq!(
        configuration("llama-tiny", None).unwrap(),
        (GptConfig::llama_tiny(), TrainOptions::tiny())
    );
    assert_eq!(
        configuration("gpt2-small", None).unwrap(),
        (GptConfig::gpt2_small(), TrainOptions::gpt2_small())
    );
    assert_eq!(
        configuration("tiny", Some("")).unwrap(),
        (GptConfig::tiny(), TrainOptions::tiny())
    );
}

#[test]
fn the_fields_named_replace_the_presets_and_only_those() {
    let toml = "[model]\nlayers = 1\nwidth = 64\nattention = { window = 32 }\npositions = { rope = [10000.0] }\n\
                [train]\nbatch = 3\nlr = 0.5\ngrad_clip = 2.5\nseed = 7\n";
    let (config, options) = configuration("tiny", Some(toml)).unwrap();
    let expected = GptConfig {
        layers: 1,
        width: 64,
        attention: Attention::Window { size: 32 },
        positions: Positions::Rope { bases: vec![10000.0] },
        ..GptConfig::tiny()
    };
    assert_eq!(config, expected);
    let expected = TrainOptions {
        batch: 3,
        lr: 0.5,
        grad_clip: Some(2.5),
        seed: 7,
        ..TrainOptions::tiny()
    };
    assert_eq!(options, expected);
}

#[test]
fn a_wrong_document_is_an_error_that_names_the_problem() {
    invalid(configuration("huge", None), &["preset", "huge"]);
    invalid(configuration("tiny", Some("[model")), &["toml", "TOML"]);
    invalid(configuration("tiny", Some("[optimizer]\nlr = 1.0\n")), &["[optimizer]"]);
    invalid(configuration("tiny", Some("model = 3\n")), &["`model` to be a table"]);
    invalid(
        configuration("tiny", Some("[model]\ndepth = 3\n")),
        &["depth", "[model]"],
    );
    invalid(
        configuration("tiny", Some("[train]\nepochs = 3\n")),
        &["epochs", "[train]"],
    );
    invalid(configuration("tiny", Some("[model]\nlayers = \"two\"\n")), &["layers"]);
    invalid(configuration("tiny", Some("[train]\nbatch = \"two\"\n")), &["[train]"]);
    invalid(
        configuration("tiny", Some("[model]\nnorm = \"batchnorm\"\n")),
        &["norm"],
    );
}
