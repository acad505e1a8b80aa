//! The `tessera` command line end to end, on the CPU: train a tiny model from a TOML file,
//! resume it, evaluate and generate from its checkpoint; and exit codes that mean something.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("the tessera binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CONFIG: &str = r#"
[model]
layers = 1
heads = 2
kv_heads = 2
width = 32
ffn_width = 64
context = 16

[train]
batch = 2
seq = 16
steps = 4
warmup = 1
eval_every = 2
eval_windows = 2
"#;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_resume_eval_generate() {
    let dir = scratch("train");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = dir.join("run");
    let run = tessera(&[
        "train",
        "--device",
        "cpu",
        "--config",
        path(&config),
        "--out",
        path(&out),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let log = text(&run);
    assert!(
        log.contains("step 4/4") && log.contains("unigram baseline") && log.contains("sample: "),
        "{log}"
    );
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000004");
    for file in ["model.safetensors", "trainer.safetensors", "config.json"] {
        assert!(out.join("step-00000004").join(file).is_file(), "{file}");
    }

    // Resuming a finished run trains no further and saves the same step again.
    let again = tessera(&["train", "--device", "cpu", "--out", path(&out), "--resume"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("resuming at step 4"), "{}", text(&again));

    let data = dir.join("text.txt");
    std::fs::write(&data, "the quick brown fox jumps over the lazy dog. ".repeat(4)).unwrap();
    let dump = dir.join("logits.npy");
    let eval = tessera(&[
        "eval",
        "--device",
        "cpu",
        "--checkpoint",
        path(&out),
        "--data",
        path(&data),
        "--seq",
        "8",
        "--dump-logits",
        path(&dump),
    ]);
    assert!(eval.status.success(), "{}", text(&eval));
    assert!(text(&eval).contains("perplexity"), "{}", text(&eval));
    let npy = std::fs::read(&dump).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    assert_eq!(npy.len(), 128 + 8 * 256 * 4, "header, then (8, 256) f32");

    let generate = tessera(&[
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        path(&out),
        "--prompt",
        "fox",
        "--tokens",
        "5",
        "--seed",
        "3",
    ]);
    assert!(generate.status.success(), "{}", text(&generate));
    assert!(String::from_utf8_lossy(&generate.stdout).starts_with("fox"));
    assert!(
        String::from_utf8_lossy(&generate.stderr).contains("5 tokens in"),
        "{}",
        text(&generate)
    );
    let twice = tessera(&[
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        path(&out),
        "--prompt",
        "fox",
        "--tokens",
        "5",
        "--seed",
        "3",
    ]);
    assert_eq!(generate.stdout, twice.stdout, "the same seed gives the same text");
    let graph = tessera(&[
        "generate",
        "--device",
        "cpu",
        "--checkpoint",
        path(&out),
        "--prompt",
        "fox",
        "--tokens",
        "5",
        "--graph",
    ]);
    assert!(!graph.status.success(), "--graph on the CPU: {}", text(&graph));
    assert!(
        text(&graph).contains("CUDA graphs need a CUDA device"),
        "{}",
        text(&graph)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_exit_with_2_and_say_why() {
    let dir = scratch("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--preset", "huge"], "preset"),
        (&["train", "--device", "tpu"], "--device tpu"),
        (&["train", "--steps", "many"], "--steps many"),
        (&["train", "--frobnicate"], "unknown argument `--frobnicate`"),
        (&["eval", "--data", "x"], "--checkpoint is required"),
        (&["generate", "--checkpoint", "/nonexistent/run"], "not a checkpoint"),
        (&["frobnicate"], "unknown command"),
    ];
    for (args, needle) in cases {
        let output = tessera(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
        assert!(text(&output).contains(needle), "{args:?}: {}", text(&output));
    }
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[model]\nlayers = \"four\"\n").unwrap();
    let output = tessera(&["train", "--device", "cpu", "--config", path(&config)]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("layers"), "{}", text(&output));
    std::fs::write(&config, "[model]\nlayerz = 4\n").unwrap();
    let output = tessera(&["train", "--device", "cpu", "--config", path(&config)]);
    assert!(text(&output).contains("unknown field `layerz`"), "{}", text(&output));
    let help = tessera(&["train", "--help"]);
    assert!(help.status.success() && text(&help).contains("--resume"));
    std::fs::remove_dir_all(&dir).unwrap();
}
