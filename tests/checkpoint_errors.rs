//! Malformed checkpoints fail with an error that names the tensor, field or file: through the
//! library and through the `export` command, never with a panic.

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, student};
use distill_serve::checkpoint::{Checkpoint, Family};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

type Stored = (Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `model.safetensors`, letting `edit` drop or replace tensors.
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, TensorView<'_>) -> Option<Stored>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| edit(&name, view).map(|(dtype, shape, data)| (name, dtype, shape, data)))
        .collect();
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn keep(view: TensorView<'_>) -> Option<Stored> {
    Some((view.dtype(), view.shape().to_vec(), view.data().to_vec()))
}

/// The error of `Checkpoint::open` and the stderr of `distill-serve export` on `dir`; both must
/// mention every one of `needles`.
fn assert_fails_naming(dir: &Path, needles: &[&str]) {
    let err = match Checkpoint::open(dir) {
        Ok(_) => panic!("checkpoint at {} opened", dir.display()),
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(err.contains(needle), "library error {err:?} does not name {needle:?}");
    }
    let out = Command::new(binary())
        .args(["export", "--checkpoint"])
        .arg(dir)
        .arg("--out")
        .arg(dir.join("onnx"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "the command panicked: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "command error {stderr:?} does not name {needle:?}"
        );
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let st = student(Family::Qwen2, 1, |_| {});
    let gone = "model.layers.1.mlp.up_proj.weight";
    rewrite_weights(
        &st.checkpoint,
        |name, view| if name == gone { None } else { keep(view) },
    );
    assert_fails_naming(&st.checkpoint, &["missing tensor", gone]);
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let st = student(Family::Llama, 1, |_| {});
    rewrite_weights(&st.checkpoint, |name, view| {
        if name == "model.norm.weight" {
            Some((Dtype::F32, vec![3], vec![0; 12]))
        } else {
            keep(view)
        }
    });
    assert_fails_naming(&st.checkpoint, &["model.norm.weight", "[3]", "[64]"]);
}

#[test]
fn unknown_family_names_model_type() {
    let st = student(Family::Qwen2, 1, |_| {});
    edit_config(&st.checkpoint, |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    assert_fails_naming(&st.checkpoint, &["model_type", "gpt2"]);
}

#[test]
fn missing_config_field_is_named() {
    let st = student(Family::Bert, 1, |_| {});
    edit_config(&st.checkpoint, |c| {
        c.remove("num_hidden_layers");
    });
    assert_fails_naming(&st.checkpoint, &["num_hidden_layers", "missing"]);
}

#[test]
fn missing_tokenizer_is_named() {
    let st = student(Family::Qwen2, 1, |_| {});
    std::fs::remove_file(st.checkpoint.join("tokenizer.json")).unwrap();
    assert_fails_naming(&st.checkpoint, &["tokenizer.json"]);
}

#[test]
fn corrupt_weights_file_is_named() {
    let st = student(Family::Qwen2, 1, |_| {});
    std::fs::write(
        st.checkpoint.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    assert_fails_naming(&st.checkpoint, &["model.safetensors", "not a safetensors file"]);
}

#[test]
fn missing_shard_is_named() {
    let st = student(Family::Qwen2, 1, |s| s.shards = 2);
    std::fs::remove_file(st.checkpoint.join("model-00002-of-00002.safetensors")).unwrap();
    assert_fails_naming(&st.checkpoint, &["model-00002-of-00002.safetensors"]);
}

#[test]
fn integer_weights_are_rejected_by_dtype() {
    let st = student(Family::Qwen2, 1, |_| {});
    rewrite_weights(&st.checkpoint, |name, view| {
        if name == "model.norm.weight" {
            Some((Dtype::I32, view.shape().to_vec(), view.data().to_vec()))
        } else {
            keep(view)
        }
    });
    let err = distill_serve::export::export(
        &st.checkpoint,
        &st.dir.path().join("onnx"),
        distill_serve::export::Precision::Fp32,
        distill_serve::export::ExternalData::Never,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.norm.weight") && err.contains("I32"), "{err}");
}
