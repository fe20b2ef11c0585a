//! The protobuf messages of `distill_serve.v1.Generate` and KServe `ModelInfer`, decoded and
//! translated as the services do.
#![no_main]

use distill_serve::api::grpc::proto::generate::GenerateRequest;
use distill_serve::api::grpc::proto::inference::ModelInferRequest;
use distill_serve::api::grpc::{translate_generate, translate_model_infer};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, message)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(request) = GenerateRequest::decode(message) {
            let _ = translate_generate(request);
        }
    } else if let Ok(request) = ModelInferRequest::decode(message) {
        let _ = translate_model_infer(&request);
    }
});
