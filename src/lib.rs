//! distill-serve: an inference server for distilled INT8 student language models.
//!
//! This crate holds the student toolchain (checkpoints, tiny students, ONNX export and INT8
//! quantisation, reference forwards) and the ONNX Runtime engine the server is built on.

pub mod checkpoint;
pub mod engine;
pub mod export;
pub mod reference;
pub mod tiny;
