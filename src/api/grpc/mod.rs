//! The gRPC API on its own port: KServe v2 `inference.GRPCInferenceService`, our
//! `distill_serve.v1.Generate` (with a server-streaming method), the standard
//! `grpc.health.v1` service and server reflection.

mod generate;
mod kserve;
mod kserve_encoder;

use std::time::Duration;

use tonic::{Code, Status};

use super::AppState;
use super::limits::MAX_REQUEST_BODY_BYTES;
use crate::infer::{ErrorKind, InferError};

/// Generated types and clients of the gRPC services.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// KServe v2 / Open Inference Protocol.
    pub mod inference {
        tonic::include_proto!("inference");
    }
    /// distill-serve's generation API.
    pub mod generate {
        tonic::include_proto!("distill_serve.v1");
    }
    /// Encoded file descriptors, for reflection.
    pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("services_descriptor");
}

/// How often the gRPC health service looks at readiness.
const HEALTH_POLL: Duration = Duration::from_millis(100);

/// Every gRPC service, ready to serve.
pub fn routes(state: AppState) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // The health service reports the whole server as `/v2/health/ready` does (model-level
    // readiness is `ModelReady`), followed as it changes: a drain, a model that stops serving.
    let watched = state.clone();
    tokio::spawn(async move {
        let mut reported = None;
        loop {
            let status = if watched.is_ready() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            if reported != Some(status) {
                health_reporter.set_service_status("", status).await;
                reported = Some(status);
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    });
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(
            proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(kserve::KServe {
                state: state.clone(),
            })
            .max_decoding_message_size(MAX_REQUEST_BODY_BYTES),
        )
        .add_service(
            proto::generate::generate_server::GenerateServer::new(generate::GenerateService { state })
                .max_decoding_message_size(MAX_REQUEST_BODY_BYTES),
        )
        .add_service(health)
        .add_service(reflection);
    Ok(routes.routes())
}

/// The neutral request of a `distill_serve.v1.Generate/Generate` message (what the service
/// does before validation; public for the fuzz targets).
pub fn translate_generate(request: proto::generate::GenerateRequest) -> Result<crate::infer::InferRequest, InferError> {
    generate::neutral(request, crate::infer::Endpoint::Generate)
}

/// The neutral request of a KServe `ModelInfer` message.
pub fn translate_model_infer(
    request: &proto::inference::ModelInferRequest,
) -> Result<crate::infer::InferRequest, InferError> {
    kserve::neutral(request)
}

/// The timeout the client set (`grpc-timeout`), if any (an unreadable one is ignored).
pub fn timeout<T>(request: &tonic::Request<T>) -> Option<Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
            let n: u64 = digits.parse().ok()?;
            match unit {
                "H" => n.checked_mul(3600).map(Duration::from_secs),
                "M" => n.checked_mul(60).map(Duration::from_secs),
                "S" => Some(Duration::from_secs(n)),
                "m" => Some(Duration::from_millis(n)),
                "u" => Some(Duration::from_micros(n)),
                "n" => Some(Duration::from_nanos(n)),
                _ => None,
            }
        })
}

impl From<InferError> for Status {
    fn from(e: InferError) -> Self {
        let code = match e.kind {
            ErrorKind::Invalid => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::Conflict => Code::Aborted,
            ErrorKind::Unprocessable => Code::FailedPrecondition,
            ErrorKind::TooLarge => Code::OutOfRange,
            ErrorKind::Overloaded => Code::ResourceExhausted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Internal => Code::Internal,
        };
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(seconds) = e.retry_after {
            // gRPC's own retry pushback (honoured by clients with a retry policy), and the
            // HTTP header's name for people reading the trailers.
            metadata.insert("grpc-retry-pushback-ms", (seconds * 1000).into());
            metadata.insert("retry-after", seconds.into());
        }
        Status::with_metadata(code, e.message, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_is_read_in_every_unit() {
        let mut request = tonic::Request::new(());
        for (value, expected) in [
            ("250m", Duration::from_millis(250)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
        ] {
            request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(timeout(&request), Some(expected), "{value}");
        }
        assert_eq!(timeout(&tonic::Request::new(())), None);
        request.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(timeout(&request), None, "an unreadable timeout is ignored");
        // Values past what a Duration of seconds holds are ignored, not wrapped (audit defect 9).
        request
            .metadata_mut()
            .insert("grpc-timeout", "5124095576030432H".parse().unwrap());
        assert_eq!(timeout(&request), None);
        request
            .metadata_mut()
            .insert("grpc-timeout", "18446744073709551615S".parse().unwrap());
        assert_eq!(timeout(&request), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn a_refusal_says_when_to_retry() {
        let status = Status::from(InferError::new(ErrorKind::Overloaded, "busy").retry_after(3));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "3000");
        assert_eq!(status.metadata().get("retry-after").unwrap(), "3");
    }

    #[test]
    fn every_error_kind_has_its_own_grpc_code() {
        let kinds = [
            ErrorKind::Invalid,
            ErrorKind::Unauthenticated,
            ErrorKind::PermissionDenied,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Unprocessable,
            ErrorKind::TooLarge,
            ErrorKind::Overloaded,
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Internal,
        ];
        let codes: std::collections::HashSet<Code> = kinds
            .iter()
            .map(|&k| Status::from(InferError::new(k, "m")).code())
            .collect();
        assert_eq!(codes.len(), kinds.len());
        let status = Status::from(InferError::invalid("top_p", "top_p must be in (0, 1], got 3"));
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "top_p must be in (0, 1], got 3")
        );
    }
}
