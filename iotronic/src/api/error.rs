//! The one JSON error shape of the API, and the mapping of every error to an HTTP status.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::error;

use crate::Error;

/// An error as the API answers it: `{"error_message": "<what to do>", "code": <status>}`
/// (the original's key), plus `"lease"` for lease conflicts and `"request"` where one exists.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) | Error::LeaseConflict { .. } => StatusCode::CONFLICT,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Board(_) => StatusCode::BAD_GATEWAY,
        Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(&self.0);
        let mut body = if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Our fault: log the whole chain, tell the caller little.
            error!(cause = ?self.0, "internal error");
            json!({"error_message": "internal error; the cloud's log has the details", "code": 500})
        } else {
            json!({"error_message": self.0.to_string(), "code": status.as_u16()})
        };
        if let Error::LeaseConflict { lease, board, expires_at } = &self.0 {
            body["lease"] = json!(lease);
            body["board"] = json!(board);
            // Unix seconds, as every other `expires_at` of the API.
            body["expires_at"] = json!(expires_at / 1000);
        }
        let mut response = (status, Json(body)).into_response();
        if let Error::Throttled { retry_after_s } = &self.0 {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, (*retry_after_s).into());
        }
        response
    }
}

/// A JSON body whose rejections (bad JSON, wrong types, missing content type) are 400s in the
/// API's error shape instead of axum's plain-text answers.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiError(Error::Invalid(rejection_message(&rejection)))),
        }
    }
}

fn rejection_message(r: &JsonRejection) -> String {
    match r {
        JsonRejection::MissingJsonContentType(_) => "send a JSON body with Content-Type: application/json".into(),
        other => format!("invalid request body: {}", other.body_text()),
    }
}

/// Fallback for unknown paths: a 404 in the error shape.
pub async fn not_found() -> ApiError {
    ApiError(Error::NotFound("no such path in the API; see /v1/openapi.json".into()))
}
