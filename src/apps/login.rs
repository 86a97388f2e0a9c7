//! The login the official SDKs make when their gateway setting points at the proxy:
//! `POST {gateway}{path_params_login}/oauth/token` with `Authorization: Basic
//! base64(client_id:client_secret)` and the form `grant_type=client_credentials`, exactly as
//! they would at `login.<region>`. The answers are Genesys's shapes (GENESYS.md), so an SDK's
//! own token handling works unchanged.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;

use crate::secret::Secret;

/// The largest login body read (the form is one short field).
pub const BODY_MAX: usize = 4096;

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// No Basic credentials, or the id or secret is wrong: 401 `invalid_client`.
    InvalidClient,
    /// A grant other than `client_credentials`.
    UnsupportedGrant,
    /// Not a form, or too large.
    InvalidRequest,
    /// Too many failed proofs from this address this minute.
    Throttled,
}

/// Client id and secret from `Authorization: Basic …` (the raw pair, as the SDKs send it).
pub fn basic_credentials(authorization: Option<&[u8]>) -> Result<(String, Secret), LoginError> {
    let value = authorization.ok_or(LoginError::InvalidClient)?;
    let value = std::str::from_utf8(value).map_err(|_| LoginError::InvalidClient)?;
    let (scheme, encoded) = value.split_once(' ').ok_or(LoginError::InvalidClient)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(LoginError::InvalidClient);
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .map_err(|_| LoginError::InvalidClient)?;
    let pair = String::from_utf8(decoded).map_err(|_| LoginError::InvalidClient)?;
    let (id, secret) = pair.split_once(':').ok_or(LoginError::InvalidClient)?;
    if id.is_empty() || secret.is_empty() {
        return Err(LoginError::InvalidClient);
    }
    Ok((id.to_string(), Secret::new(secret)))
}

/// The form must say `grant_type=client_credentials` (other fields are ignored, as at
/// Genesys).
pub fn check_grant(body: &[u8]) -> Result<(), LoginError> {
    if body.len() > BODY_MAX {
        return Err(LoginError::InvalidRequest);
    }
    let grant = form_urlencoded::parse(body)
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.into_owned());
    match grant.as_deref() {
        Some("client_credentials") => Ok(()),
        Some(_) => Err(LoginError::UnsupportedGrant),
        None => Err(LoginError::InvalidRequest),
    }
}

/// `{"access_token","token_type","expires_in"}`, as Genesys answers.
pub fn success_body(token: &str, expires_in: u64) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": expires_in,
        })
        .to_string(),
    )
}

/// The status and body Genesys answers for the same failure.
pub fn error_answer(e: LoginError) -> (u16, Bytes) {
    let (status, error, description) = match e {
        LoginError::InvalidClient => (401, "invalid_client", "authentication failed"),
        LoginError::UnsupportedGrant => (
            400,
            "unsupported_grant_type",
            "only client_credentials is supported by the proxy",
        ),
        LoginError::InvalidRequest => (
            400,
            "invalid_request",
            "expected a form with grant_type=client_credentials",
        ),
        LoginError::Throttled => (
            400,
            "invalid_request",
            "rate limit exceeded; too many failed logins from this address, retry in a minute",
        ),
    };
    let body = serde_json::json!({
        "error": error,
        "description": description,
        "error_description": description,
    });
    (status, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(pair: &str) -> String {
        format!("Basic {}", STANDARD.encode(pair))
    }

    #[test]
    fn the_sdk_login_is_understood() {
        let h = basic("billing-app:s3cret:with:colons");
        let (id, secret) = basic_credentials(Some(h.as_bytes())).unwrap();
        assert_eq!(id, "billing-app");
        assert_eq!(secret.expose(), "s3cret:with:colons");
        assert_eq!(check_grant(b"grant_type=client_credentials"), Ok(()));
        assert_eq!(
            check_grant(b"grant_type=client_credentials&scope=x"),
            Ok(())
        );
    }

    #[test]
    fn anything_else_is_refused_in_genesys_shape() {
        for bad in [
            None,
            Some("Bearer x".to_string()),
            Some("Basic !!!".to_string()),
            Some(basic("no-colon")),
            Some(basic(":secret")),
            Some(basic("id:")),
        ] {
            assert_eq!(
                basic_credentials(bad.as_deref().map(str::as_bytes)).err(),
                Some(LoginError::InvalidClient),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_grant(b"grant_type=password"),
            Err(LoginError::UnsupportedGrant)
        );
        assert_eq!(check_grant(b"{}"), Err(LoginError::InvalidRequest));
        let (status, body) = error_answer(LoginError::InvalidClient);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));
    }
}
