//! The tenant a request acts for: an extractor that reads `Authorization: Bearer <token>`
//! and looks the token up in `[api.tokens]`, or answers 401.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use super::{ApiError, App};

/// The tenant whose token the request carries. A handler that takes one answers only
/// authenticated requests, and the extractor runs before any other parameter is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tenant(pub(super) String);

impl FromRequestParts<App> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        authenticate(&app.tokens, &parts.headers).map(Tenant)
    }
}

/// The tenant of the bearer token in `headers`, from `(token, tenant)` pairs.
pub(super) fn authenticate(
    tokens: &[(String, String)],
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_owned());
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?
        .to_str()
        .map_err(|_| unauthorized("unreadable Authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("Authorization must be: Bearer <token>"))?
        .trim();
    // Compare against every token without stopping early, so the time taken does not say
    // how much of a token was right or which one matched.
    let mut found = None;
    for (t, tenant) in tokens {
        if constant_time_eq(t.as_bytes(), token.as_bytes()) {
            found = Some(tenant.clone());
        }
    }
    found.ok_or_else(|| unauthorized("unknown token"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn tokens() -> Vec<(String, String)> {
        [("acme-token", "acme"), ("beta-token", "beta")]
            .map(|(t, n)| (t.to_owned(), n.to_owned()))
            .to_vec()
    }

    fn with_auth(v: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        h
    }

    /// The 401's message.
    fn refused(h: &HeaderMap) -> String {
        let e = authenticate(&tokens(), h).unwrap_err();
        assert_eq!(e.0, StatusCode::UNAUTHORIZED);
        e.1
    }

    #[test]
    fn a_known_token_names_its_tenant() {
        assert_eq!(
            authenticate(&tokens(), &with_auth(b"Bearer acme-token")).unwrap(),
            "acme"
        );
        assert_eq!(
            authenticate(&tokens(), &with_auth(b"Bearer beta-token ")).unwrap(),
            "beta"
        );
    }

    #[test]
    fn a_missing_malformed_or_unknown_token_is_a_401_that_says_which() {
        assert_eq!(
            refused(&HeaderMap::new()),
            "missing Authorization: Bearer <token>"
        );
        assert_eq!(
            refused(&with_auth(b"Bearer \xff")),
            "unreadable Authorization header"
        );
        assert_eq!(
            refused(&with_auth(b"Basic YWNtZQ==")),
            "Authorization must be: Bearer <token>"
        );
        assert_eq!(
            refused(&with_auth(b"bearer acme-token")),
            "Authorization must be: Bearer <token>"
        );
        for t in ["acme-toke", "acme-token2", "ACME-TOKEN", ""] {
            assert_eq!(
                refused(&with_auth(format!("Bearer {t}").as_bytes())),
                "unknown token",
                "{t:?}"
            );
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
