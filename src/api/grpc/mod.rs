//! The gRPC API on its own port: KServe v2 `inference.GRPCInferenceService`, our
//! `distill_serve.v1.Generate` (with a server-streaming method), the standard
//! `grpc.health.v1` service and server reflection.

mod generate;
mod kserve;

use std::time::{Duration, Instant};

use tonic::{Code, Status};

use super::AppState;
use super::error::ApiError;

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

/// Every gRPC service, ready to serve.
pub fn routes(state: AppState) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // The health service reports the whole server; model-level readiness is `ModelReady`.
    let ready = state.repository.all_ready();
    tokio::spawn(async move {
        let status = if ready {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health_reporter.set_service_status("", status).await;
    });
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(
            proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(kserve::KServe {
                state: state.clone(),
            }),
        )
        .add_service(proto::generate::generate_server::GenerateServer::new(
            generate::GenerateService { state },
        ))
        .add_service(health)
        .add_service(reflection);
    Ok(routes.routes())
}

/// The deadline the client set (`grpc-timeout`), else the server default.
pub fn deadline<T>(request: &tonic::Request<T>, default: Option<Duration>) -> Option<Instant> {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
            let n: u64 = digits.parse().ok()?;
            Some(match unit {
                "H" => Duration::from_secs(n * 3600),
                "M" => Duration::from_secs(n * 60),
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return None,
            })
        });
    timeout.or(default).map(|t| Instant::now() + t)
}

impl From<crate::scheduler::RequestError> for Status {
    fn from(e: crate::scheduler::RequestError) -> Self {
        match e {
            crate::scheduler::RequestError::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
            crate::scheduler::RequestError::Failed(message) => Status::internal(message),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match e.status.as_u16() {
            400 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        Status::new(code, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_sets_the_deadline_and_the_default_fills_in() {
        let hour = Some(Duration::from_secs(3600));
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("grpc-timeout", "250m".parse().unwrap());
        let before = Instant::now();
        let set = deadline(&request, hour).unwrap();
        let after = Instant::now();
        let quarter = Duration::from_millis(250);
        assert!(set >= before + quarter && set <= after + quarter);
        let plain = tonic::Request::new(());
        assert!(deadline(&plain, hour).unwrap() >= before + Duration::from_secs(3600));
        assert_eq!(deadline(&plain, None), None);
        request.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(deadline(&request, None), None, "an unreadable timeout is ignored");
    }
}
