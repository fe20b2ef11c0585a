//! The last token over the wire: an answer cut inside a multi-byte character ends with U+FFFD,
//! so its text is the tokenizer's decoding of its token ids on every route.

mod common;

use common::server::TestServer;
use distill_serve::api::grpc::proto::generate::{Constraint, GenerateRequest, generate_client::GenerateClient};
use futures::StreamExt;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// A server whose one-term list makes the tiny student spell "中文病" byte by byte (its
/// tokenizer has no merges for Chinese), so `max_tokens` cuts a character.
fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("zh.tsv");
    std::fs::write(&list, "code\tterm\nZ1\t中文病\n").unwrap();
    let server = TestServer::start(&["--terminology", &format!("zh=tsv:{}", list.display())]);
    (server, dir)
}

fn body(max_tokens: usize, stream: bool) -> Value {
    json!({"model": "tiny", "prompt": "诊断:", "max_tokens": max_tokens, "stream": stream,
           "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": true,
           "constraint": {"terminology": "zh", "match": "term"}})
}

fn ids(tokens: &[Value]) -> Vec<u32> {
    tokens
        .iter()
        .map(|t| t.as_str().unwrap().strip_prefix("token_id:").unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn an_answer_cut_inside_a_chinese_character_ends_with_a_replacement_character() {
    let (server, _dir) = server();
    let tokenizer = Tokenizer::from_file(server.repo.join("tiny/1/tokenizer.json")).unwrap();
    let mut grpc = GenerateClient::connect(server.grpc.clone()).await.unwrap();
    // 9 bytes: cuts after 1, 2, 4 and 5 bytes are inside a character; 3, 9 are not.
    for max_tokens in [1, 2, 3, 4, 5, 9] {
        let v: Value = server
            .post("/v1/completions", &body(max_tokens, false))
            .await
            .json()
            .await
            .unwrap();
        let choice = &v["choices"][0];
        let text = choice["text"].as_str().unwrap();
        let generated = ids(choice["logprobs"]["tokens"].as_array().unwrap());
        assert_eq!(generated.len(), max_tokens, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], max_tokens);
        assert_eq!(
            text,
            tokenizer.decode(&generated, false).unwrap(),
            "max_tokens {max_tokens}"
        );
        if max_tokens % 3 != 0 {
            assert!(text.ends_with('\u{FFFD}'), "{text:?}");
        }

        let sse = server
            .post("/v1/completions", &body(max_tokens, true))
            .await
            .text()
            .await
            .unwrap();
        let streamed: String = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| {
                serde_json::from_str::<Value>(d).ok()?["choices"][0]["text"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(streamed, text, "SSE, max_tokens {max_tokens}");

        let request = GenerateRequest {
            model: "tiny".into(),
            prompt: "诊断:".into(),
            max_tokens: Some(max_tokens as i64),
            temperature: Some(0.0),
            constraint: Some(Constraint {
                terminology: "zh".into(),
                r#match: "term".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let whole = grpc.generate(request.clone()).await.unwrap().into_inner();
        assert_eq!(whole.text, text, "gRPC, max_tokens {max_tokens}");
        let mut stream = grpc.generate_stream(request).await.unwrap().into_inner();
        let mut pieces = String::new();
        while let Some(msg) = stream.next().await {
            pieces.push_str(&msg.unwrap().text);
        }
        assert_eq!(pieces, text, "gRPC stream, max_tokens {max_tokens}");
    }
}
