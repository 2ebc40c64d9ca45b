//! One error type for the whole crate. Every failure a user can cause (bad file, bad
//! config, bad shape, wrong device) becomes an `Error` with a stable code and a message
//! that names the file or setting; nothing here panics on user input.

use std::fmt;

/// Stable machine-readable error codes (also exposed to JS as `error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Io,
    Parse,
    Format,
    Shape,
    Unsupported,
    Config,
    Device,
    Data,
    Numeric,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Io => "io",
            ErrorCode::Parse => "parse",
            ErrorCode::Format => "format",
            ErrorCode::Shape => "shape",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Config => "config",
            ErrorCode::Device => "device",
            ErrorCode::Data => "data",
            ErrorCode::Numeric => "numeric",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    /// Prefix the message with where it happened (a file name, a tensor name...).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! bail {
    ($code:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorCode::$code, format!($($arg)*)))
    };
}
pub(crate) use bail;

macro_rules! err {
    ($code:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorCode::$code, format!($($arg)*))
    };
}
pub(crate) use err;

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorCode::Io, e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(ErrorCode::Parse, e.to_string())
    }
}

impl From<burn::tensor::ExecutionError> for Error {
    fn from(e: burn::tensor::ExecutionError) -> Self {
        device_error(format!("{e:?}"))
    }
}

/// A failure reported by the GPU runtime. Running out of memory becomes a message naming
/// what to reduce (the runtime's own account follows it).
pub fn device_error(detail: String) -> Error {
    let lower = detail.to_ascii_lowercase();
    let size = lower.split("can't allocate buffer of size:").nth(1).and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next()).and_then(|n| n.parse::<u64>().ok());
    if size.is_some() || lower.contains("out of memory") {
        let what = size.map_or("memory".to_string(), |n| format!("a {:.0} MiB buffer", n as f64 / (1u64 << 20) as f64));
        return Error::new(
            ErrorCode::Device,
            format!(
                "the GPU ran out of memory (it could not allocate {what}): reduce batch or seq-len, set a memory budget (--memory-budget-mib, JS memoryBudgetMiB) so that batches are split, or hold the base quantized (--base keep | q4_1 | nf4); the runtime said: {detail}"
            ),
        );
    }
    Error::new(ErrorCode::Device, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_names_what_to_reduce() {
        let e = device_error("An error happened during execution\nCaused by:\n  An IO error happened\nCaused by:\n  can't allocate buffer of size: 200540160".into());
        assert!(e.message.starts_with("the GPU ran out of memory (it could not allocate a 191 MiB buffer): reduce batch or seq-len"), "{e}");
        assert!(e.message.ends_with("can't allocate buffer of size: 200540160"), "the runtime's account is kept: {e}");
        assert_eq!(device_error("lost".into()).message, "lost");
    }
}
