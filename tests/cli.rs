//! The `tiny` and `export` commands as a user runs them: real processes, real files.

mod common;

use std::path::Path;
use std::process::Command;

use common::{PROMPTS, Padding, binary, decoder_batch_logits, student};
use distill_serve::checkpoint::{Checkpoint, Family, ModelConfig};
use distill_serve::engine::{DecoderSession, SessionOptions};
use distill_serve::export::{EXTERNAL_DATA_FILE, ExternalData, MODEL_FILE, Precision};
use distill_serve::reference::max_abs_diff;

fn run(args: &[&str], dir: &Path) -> String {
    let out = Command::new(binary()).args(args).current_dir(dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn tiny_then_export_int8_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    run(
        &[
            "tiny",
            "--family",
            "llama",
            "--out",
            "ck",
            "--seed",
            "3",
            "--num-layers",
            "3",
            "--format",
            "5",
        ],
        dir.path(),
    );
    let ckpt = Checkpoint::open(dir.path().join("ck")).unwrap();
    let ModelConfig::Decoder(c) = &ckpt.config else {
        panic!("not a decoder")
    };
    assert_eq!((c.num_layers, c.family), (3, Family::Llama));
    assert!(
        ckpt.tokenizer
            .chat_template
            .as_deref()
            .unwrap_or_default()
            .contains("<|im_start|>")
    );
    assert!(
        dir.path().join("ck/chat_template.jinja").exists(),
        "5.x layout writes the template file"
    );

    let report = run(&["export", "--checkpoint", "ck", "--out", "onnx", "--int8"], dir.path());
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["precision"], "int8-matmul-integer");
    // Fused attention by default where the head size allows it (the tiny student's does).
    assert_eq!(report["attention"], "gqa");
    for file in [
        MODEL_FILE,
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(dir.path().join("onnx").join(file).exists(), "{file} not written");
    }
    let session = DecoderSession::open(&dir.path().join("onnx").join(MODEL_FILE), SessionOptions::default()).unwrap();
    assert_eq!(session.num_layers(), 3);
    assert!(session.fused_attention());

    let args = [
        "export",
        "--checkpoint",
        "ck",
        "--out",
        "past",
        "--attention",
        "with-past",
    ];
    let report: serde_json::Value = serde_json::from_str(&run(&args, dir.path())).unwrap();
    assert_eq!(report["attention"], "with-past");

    // A head size the fused op does not take (24) keeps the with-past layout by default.
    let tiny = [
        "tiny",
        "--family",
        "llama",
        "--out",
        "odd",
        "--hidden-size",
        "72",
        "--num-heads",
        "3",
        "--num-kv-heads",
        "1",
    ];
    run(&tiny, dir.path());
    let report = run(&["export", "--checkpoint", "odd", "--out", "odd-onnx"], dir.path());
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["attention"], "with-past");
}

#[test]
fn tiny_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    for (out, seed) in [("a", "9"), ("b", "9"), ("c", "10")] {
        run(&["tiny", "--family", "qwen2", "--out", out, "--seed", seed], dir.path());
    }
    let read = |d: &str, f: &str| std::fs::read(dir.path().join(d).join(f)).unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(read("a", file), read("b", file), "{file} differs for the same seed");
    }
    assert_ne!(read("a", "model.safetensors"), read("c", "model.safetensors"));
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["tiny", "--family", "gpt2", "--out", "x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gpt2"), "{stderr}");
    let out = Command::new(binary())
        .args(["export", "--checkpoint", "does-not-exist", "--out", "x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does-not-exist") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn external_data_export_gives_the_same_logits() {
    let st = student(Family::Qwen2, 4, |_| {});
    let inline = st.export("inline", Precision::Fp32, ExternalData::Never);
    let external = st.export("external", Precision::Fp32, ExternalData::Always);
    let data = external.with_file_name(EXTERNAL_DATA_FILE);
    assert!(std::fs::metadata(&data).unwrap().len() > std::fs::metadata(&external).unwrap().len());
    assert!(!inline.with_file_name(EXTERNAL_DATA_FILE).exists());
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| st.encode(p)).collect();
    let logits = |model: &Path| {
        let mut s = DecoderSession::open(model, SessionOptions::default()).unwrap();
        decoder_batch_logits(&mut s, &seqs, Padding::Left)
    };
    let (a, b) = (logits(&inline), logits(&external));
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert_eq!(max_abs_diff(x, y), 0.0);
    }
}
