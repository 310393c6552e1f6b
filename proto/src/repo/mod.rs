//! The repository: where objects live and how each one is framed.

pub mod backup;
pub mod frame;
pub mod layout;
#[cfg(feature = "remote")]
pub mod remote;
pub mod seal;

/// A repository URL with any user name or password removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_never_displayed() {
        assert_eq!(super::redact_url("s3://key:secret@bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(super::redact_url("file:///tmp/repo"), "file:///tmp/repo");
        assert_eq!(super::redact_url("./relative"), "./relative");
    }
}
