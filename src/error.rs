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

/// How a lost GPU device's errors begin ([`Error::is_device_lost`]).
pub const DEVICE_LOST: &str = "the GPU device was lost";

impl Error {
    /// Whether this error says the GPU device was lost (a driver reset, the device destroyed):
    /// nothing on that device can be used again, a new one has to be acquired
    /// (`device::reacquire`) and the work restored from a checkpoint.
    pub fn is_device_lost(&self) -> bool {
        self.code == ErrorCode::Device && self.message.contains(DEVICE_LOST)
    }
}

/// A failure reported by the GPU runtime. Running out of memory becomes a message naming
/// what to reduce (the runtime's own account follows it); a lost device says so first.
pub fn device_error(detail: String) -> Error {
    let lower = detail.to_ascii_lowercase();
    // cubecl marks a device "poisoned" once wgpu reports it lost; every later call fails so.
    if lower.contains("device is poisoned") || lower.contains("device was poisoned") {
        // The text may come Debug-formatted (newlines escaped) from a failed read-back.
        let detail = detail.replace("\\n", "\n");
        let reason = detail.lines().map(|l| l.trim().trim_end_matches(':')).find(|l| l.contains("Destroyed") || l.contains("Unknown:") || l.contains("lost")).unwrap_or("poisoned");
        return Error::new(ErrorCode::Device, format!("{DEVICE_LOST} ({reason}): acquire a new device and resume from the last checkpoint"));
    }
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
        assert!(!device_error("lost".into()).is_device_lost());
    }

    #[test]
    fn a_poisoned_device_is_a_lost_device() {
        // What a read-back on a destroyed device gave natively (cubecl 0.11.3, wgpu 30 on
        // lavapipe), Debug-formatted as `tensor::read` reports it.
        let e = device_error(r#"read back: StorageAccess(Read("The device is poisoned\nCaused by:\n  Destroyed: \nBacktrace:\nNo backtrace available"))"#.into());
        assert!(e.is_device_lost(), "{e}");
        assert_eq!(e.message, "the GPU device was lost (Destroyed): acquire a new device and resume from the last checkpoint");
        // A reason wgpu gives with a message is kept.
        let e = device_error("An error happened during execution\nCaused by:\n  The device is poisoned\nCaused by:\n  Unknown: the driver reset\n".into());
        assert_eq!(e.message, "the GPU device was lost (Unknown: the driver reset): acquire a new device and resume from the last checkpoint");
    }
}
