//! distill-serve: an inference server for distilled INT8 student language models.
//!
//! The student toolchain (checkpoints, tiny students, ONNX export and INT8 quantisation,
//! reference forwards), the ONNX Runtime engine, generation, the model repository and the
//! HTTP API.

pub mod api;
pub mod checkpoint;
pub mod config;
pub mod constrain;
pub mod distill;
pub mod engine;
pub mod export;
pub mod generate;
pub mod metrics;
pub mod recipe;
pub mod reference;
pub mod repository;
pub mod scheduler;
pub mod server;
pub mod tiny;
pub mod tokenize;
