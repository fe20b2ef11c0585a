//! The gRPC API of a real server process on loopback: KServe v2 `ModelInfer`, the streaming
//! `Generate` service, health and reflection, and their error codes.

mod common;

use std::collections::HashMap;

use common::server::TestServer;
use distill_serve::api::grpc::proto::generate::{
    ChatMessage, Constraint, GenerateRequest, generate_client::GenerateClient,
};
use distill_serve::api::grpc::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    ServerReadyRequest, grpc_inference_service_client::GrpcInferenceServiceClient, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::Code;

const PROMPT: &str = "The patient reports chest pain";

fn params(max_tokens: i64) -> HashMap<String, InferParameter> {
    HashMap::from([
        (
            "max_tokens".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(max_tokens)),
            },
        ),
        (
            "temperature".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(0.0)),
            },
        ),
    ])
}

fn infer_request(model: &str, datatype: &str, raw: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        parameters: params(16),
        inputs: vec![InferInputTensor {
            name: "text_input".into(),
            datatype: datatype.into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(|_| ()).unwrap_err().code()
}

fn length_prefixed(text: &[u8]) -> Vec<u8> {
    let mut raw = (text.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(text);
    raw
}

async fn http_completion(server: &TestServer, body: Value, path: &str) -> Value {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn the_same_greedy_prompt_gives_the_same_text_over_grpc_and_http() {
    let server = TestServer::start(&[]);
    let body = json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0});
    let http_text = http_completion(&server, body, "/v1/completions").await["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!http_text.is_empty());

    let mut kserve = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();
    let reply = kserve
        .model_infer(infer_request("tiny", "BYTES", length_prefixed(PROMPT.as_bytes())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.outputs[0].name, "text_output");
    assert_eq!(reply.raw_output_contents[0][4..], *http_text.as_bytes());

    // Contents instead of raw bytes give the same.
    let mut by_contents = infer_request("tiny", "BYTES", Vec::new());
    by_contents.raw_input_contents.clear();
    by_contents.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: vec![PROMPT.into()],
        ..Default::default()
    });
    let reply = kserve.model_infer(by_contents).await.unwrap().into_inner();
    assert_eq!(reply.raw_output_contents[0][4..], *http_text.as_bytes());

    let mut generate = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let request = GenerateRequest {
        model: "tiny".into(),
        prompt: PROMPT.into(),
        max_tokens: Some(16),
        temperature: Some(0.0),
        ..Default::default()
    };
    let whole = generate.generate(request.clone()).await.unwrap().into_inner();
    assert_eq!(whole.text, http_text);
    assert_eq!(whole.usage.unwrap().completion_tokens, 16);

    let mut stream = generate.generate_stream(request).await.unwrap().into_inner();
    let mut streamed = String::new();
    let mut pieces = 0;
    let mut last = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        streamed.push_str(&msg.text);
        pieces += 1;
        last = Some(msg);
    }
    assert_eq!(streamed, http_text);
    assert!(pieces > 2, "the text arrived in {pieces} messages");
    assert_eq!(last.unwrap().finish_reason, "length");

    // Chat messages through the stream match /v1/chat/completions.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0});
    let http_chat = http_completion(&server, chat, "/v1/chat/completions").await["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let request = GenerateRequest {
        model: "tiny".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Hello".into(),
        }],
        max_tokens: Some(12),
        temperature: Some(0.0),
        ..Default::default()
    };
    let mut stream = generate.generate_stream(request).await.unwrap().into_inner();
    let mut text = String::new();
    while let Some(msg) = stream.next().await {
        text.push_str(&msg.unwrap().text);
    }
    assert_eq!(text, http_chat);
}

#[tokio::test]
async fn bad_requests_get_the_right_status_codes() {
    let server = TestServer::start(&[]);
    let mut kserve = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();

    let wrong_type = infer_request("tiny", "FP32", length_prefixed(b"x"));
    let status = kserve.model_infer(wrong_type).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("BYTES"), "{}", status.message());
    assert_eq!(
        code(
            kserve
                .model_infer(infer_request("nope", "BYTES", length_prefixed(b"x")))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            kserve
                .model_infer(infer_request("tiny", "BYTES", length_prefixed(b"\xff\xfe")))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            kserve
                .model_infer(infer_request("tiny", "BYTES", vec![9, 0, 0, 0, b'x']))
                .await
        ),
        Code::InvalidArgument
    );
    let long = "word ".repeat(3000);
    let status = kserve
        .model_infer(infer_request("tiny", "BYTES", length_prefixed(long.as_bytes())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("2048"), "{}", status.message());
    let mut too_many = infer_request("tiny", "BYTES", length_prefixed(b"x"));
    too_many.parameters = params(100_000);
    assert_eq!(code(kserve.model_infer(too_many).await), Code::InvalidArgument);

    let mut generate = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let neither = GenerateRequest {
        model: "tiny".into(),
        ..Default::default()
    };
    assert_eq!(code(generate.generate(neither).await), Code::InvalidArgument);

    // Still serving.
    assert!(
        kserve
            .model_infer(infer_request("tiny", "BYTES", length_prefixed(b"ok")))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn health_metadata_and_reflection() {
    let server = TestServer::start(&[]);
    let mut kserve = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();
    assert!(
        kserve
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = kserve
        .model_ready(ModelReadyRequest {
            name: "tiny".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let meta = kserve
        .model_metadata(ModelMetadataRequest {
            name: "tiny".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (meta.versions, meta.inputs[0].datatype.as_str()),
        (vec!["1".to_string()], "BYTES")
    );
    let wrong_version = kserve
        .model_metadata(ModelMetadataRequest {
            name: "tiny".into(),
            version: "7".into(),
        })
        .await;
    assert_eq!(wrong_version.unwrap_err().code(), Code::NotFound);

    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "inference.GRPCInferenceService",
        "distill_serve.v1.Generate",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted() {
    let server = TestServer::start(&["--max-queue", "1"]);
    let request = GenerateRequest {
        model: "tiny".into(),
        prompt: "Long".into(),
        max_tokens: Some(400),
        stop: vec!["never-xyz".into()],
        ..Default::default()
    };
    let calls = (0..10).map(|_| {
        let url = server.grpc.clone();
        let request = request.clone();
        async move { GenerateClient::connect(url).await.unwrap().generate(request).await }
    });
    let results = futures::future::join_all(calls).await;
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok + exhausted, 10, "only OK or RESOURCE_EXHAUSTED expected");
    assert!(ok >= 1 && exhausted >= 1, "{ok} ok, {exhausted} exhausted");
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded() {
    // The server default deadline applies to calls that set none (a client-set `grpc-timeout`
    // is enforced by the client too, so its ending would race the server's).
    let server = TestServer::start(&["--request-timeout-ms", "40"]);
    // Greedy: a sampled answer may reach an end-of-sequence token before the deadline.
    let request = GenerateRequest {
        model: "tiny".into(),
        prompt: "Long".into(),
        max_tokens: Some(1500),
        temperature: Some(0.0),
        stop: vec!["never-xyz".into()],
        ..Default::default()
    };
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let status = client.generate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let expired = server
        .metric("distill_serve_rejected_requests_total{model=\"tiny\",reason=\"deadline_exceeded\"}")
        .await;
    assert_eq!(expired, 1.0);
}

/// The same invalid request, over OpenAI HTTP and gRPC `Generate`: matching status codes and the
/// same message, because one layer validates for every protocol.
#[tokio::test]
async fn the_same_invalid_request_fails_alike_over_http_and_grpc() {
    let server = TestServer::start(&[]);
    let mut generate = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    let cases: [(Value, GenerateRequest, u16, Code); 5] = [
        (
            json!({"model": "tiny", "prompt": PROMPT, "top_p": 3.0}),
            GenerateRequest {
                top_p: Some(3.0),
                ..generate_request("tiny")
            },
            400,
            Code::InvalidArgument,
        ),
        (
            json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 0}),
            GenerateRequest {
                max_tokens: Some(0),
                ..generate_request("tiny")
            },
            400,
            Code::InvalidArgument,
        ),
        (
            json!({"model": "tiny", "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}),
            GenerateRequest {
                stop: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
                ..generate_request("tiny")
            },
            400,
            Code::InvalidArgument,
        ),
        (
            json!({"model": "tiny", "prompt": PROMPT, "constraint": {"terminology": "nowhere"}}),
            GenerateRequest {
                constraint: Some(Constraint {
                    terminology: "nowhere".into(),
                    ..Default::default()
                }),
                ..generate_request("tiny")
            },
            400,
            Code::InvalidArgument,
        ),
        (
            json!({"model": "absent", "prompt": PROMPT}),
            generate_request("absent"),
            404,
            Code::NotFound,
        ),
    ];
    for (body, request, http_status, grpc_code) in cases {
        let response = server.post("/v1/completions", &body).await;
        assert_eq!(response.status(), http_status, "{body}");
        let http_message = response.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        let status = generate.generate(request).await.unwrap_err();
        assert_eq!(status.code(), grpc_code, "{body}");
        assert_eq!(status.message(), http_message, "{body}");
    }
}

fn generate_request(model: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: PROMPT.into(),
        max_tokens: Some(4),
        ..Default::default()
    }
}

/// Every protocol counts its requests in `distill_serve_requests_total`, by outcome.
#[tokio::test]
async fn grpc_generate_and_model_infer_are_counted() {
    let server = TestServer::start(&[]);
    let counter = |endpoint: &str, outcome: &str| {
        format!(
            "distill_serve_requests_total{{endpoint=\"{endpoint}\",model=\"tiny\",outcome=\"{outcome}\",tenant=\"anonymous\"}}"
        )
    };
    let mut generate = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    generate.generate(generate_request("tiny")).await.unwrap();
    generate.generate(generate_request("tiny")).await.unwrap();
    let bad = GenerateRequest {
        temperature: Some(9.0),
        ..generate_request("tiny")
    };
    generate.generate(bad).await.unwrap_err();
    let mut stream = generate
        .generate_stream(generate_request("tiny"))
        .await
        .unwrap()
        .into_inner();
    while let Some(message) = stream.next().await {
        message.unwrap();
    }
    let mut kserve = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();
    kserve
        .model_infer(infer_request("tiny", "BYTES", length_prefixed(b"ok")))
        .await
        .unwrap();
    server
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": PROMPT, "max_tokens": 2}),
        )
        .await;
    assert_eq!(server.metric(&counter("generate", "success")).await, 2.0);
    assert_eq!(server.metric(&counter("generate", "invalid_request_error")).await, 1.0);
    assert_eq!(server.metric(&counter("generate_stream", "success")).await, 1.0);
    assert_eq!(server.metric(&counter("model_infer", "success")).await, 1.0);
    assert_eq!(server.metric(&counter("completions", "success")).await, 1.0);
}

/// With `--api-key`, the gRPC methods that run models ask for it as HTTP `/v1` does
/// (UNAUTHENTICATED without or with a wrong key); health, readiness and metadata stay open for
/// probes.
#[tokio::test]
async fn the_api_key_guards_grpc_generation_as_it_guards_http() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = TestServer::start(&["--api-key", "s3cret"]);
    fn with_key<T>(key: Option<&str>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    }
    let generate = GenerateRequest {
        model: "tiny".into(),
        prompt: PROMPT.into(),
        max_tokens: Some(3),
        ..Default::default()
    };
    let mut client = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    for key in [None, Some("wrong")] {
        let status = client.generate(with_key(key, generate.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}: {status:?}");
        let status = client
            .generate_stream(with_key(key, generate.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}");
    }
    assert!(client.generate(with_key(Some("s3cret"), generate)).await.is_ok());

    let mut kserve = GrpcInferenceServiceClient::connect(server.grpc.clone()).await.unwrap();
    let infer = infer_request("tiny", "BYTES", length_prefixed(PROMPT.as_bytes()));
    let status = kserve.model_infer(infer.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let answer = kserve.model_infer(with_key(Some("s3cret"), infer)).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert!(
        kserve
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    assert!(
        health
            .check(HealthCheckRequest { service: String::new() })
            .await
            .is_ok()
    );

    let r = server
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(r.status(), 401);
}
