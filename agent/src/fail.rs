//! Errors we raise ourselves after checking something, each with a hint that
//! says what to do. `cli` prints the message, then `hint: …`.

use std::fmt;

#[derive(Debug)]
pub struct Fail {
    pub message: String,
    pub hint: String,
}

impl Fail {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Fail {
        Fail { message: message.into(), hint: hint.into() }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fail {}
