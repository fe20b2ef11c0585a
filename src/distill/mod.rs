//! Distillation refresh: pull teacher outputs, fine-tune the student with knowledge
//! distillation, export and quantise it, check that it is better, and swap it in.

pub mod client;
pub mod drift;
pub mod encoder_model;
pub mod encoder_train;
pub mod eval;
pub mod finetune;
mod guards;
pub mod heldout;
pub mod job;
pub mod loss;
pub mod model;
pub mod outbound;
pub mod service;
pub mod store;
pub mod teacher;
pub mod trainer;
pub mod whitebox;
