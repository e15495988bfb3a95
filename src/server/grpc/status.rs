//! The one place where library errors become gRPC statuses.

use tonic::{Code, Status};

pub use crate::proto::code_name;
use crate::Error;

impl From<Error> for Status {
    /// Not logged here: the request layer logs every call once, with its
    /// request id, code and message.
    fn from(err: Error) -> Self {
        let code = code_of(&err);
        if code != Code::Internal {
            return Status::new(code, bounded(err.to_string()));
        }
        // A server fault's details (file paths, library messages) are for the
        // operator: they travel to the request layer in a header that it logs
        // and removes, and the client reads a message without them.
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Ok(detail) = encode_detail(&err.to_string()).parse() {
            metadata.insert(DETAIL_HEADER, detail);
        }
        Status::with_metadata(code, INTERNAL_MESSAGE, metadata)
    }
}

/// What a client reads of a server fault.
pub const INTERNAL_MESSAGE: &str =
    "internal error: the server's log has the details under this call's request id";

/// The response header that carries a server fault's details from the handler
/// to the request layer, which logs it and takes it out.
pub const DETAIL_HEADER: &str = "x-tlserve-error-detail";

/// `text`, cut, with every byte outside printable ASCII percent-encoded, as a
/// header value allows.
fn encode_detail(text: &str) -> String {
    let mut out = String::new();
    for byte in bounded(text.to_owned()).bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Longest status message, in characters. Messages may quote what a client
/// sent (a name, a label); a bound keeps a 4 MB name from coming back as a
/// 4 MB response header.
pub const MAX_MESSAGE_CHARS: usize = 1024;

pub fn bounded(mut message: String) -> String {
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// The gRPC code of each error.
pub fn code_of(err: &Error) -> Code {
    match err {
        Error::BackboneNotFound(_) | Error::HeadNotFound(_) | Error::NotFound { .. } => {
            Code::NotFound
        }
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::LimitExceeded(_) | Error::QueueFull(_) => Code::ResourceExhausted,
        Error::Cancelled(_) => Code::Cancelled,
        Error::InvalidInput { .. } | Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::DeadlineExceeded(_) | Error::TimedOut(_) => Code::DeadlineExceeded,
        Error::BackboneLoading(_) | Error::BackboneFailed { .. } | Error::ShuttingDown => {
            Code::Unavailable
        }
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::Inference(_) | Error::ModelLoad(_) | Error::Storage(_) | Error::Internal(_) => {
            Code::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_precise_codes() {
        let cases = [
            (Error::BackboneNotFound("x".into()), Code::NotFound),
            (
                Error::InvalidInput {
                    index: 3,
                    reason: "text is empty".into(),
                },
                Code::InvalidArgument,
            ),
            (Error::QueueFull("x".into()), Code::ResourceExhausted),
            (
                Error::DeadlineExceeded(std::time::Duration::ZERO),
                Code::DeadlineExceeded,
            ),
            (Error::BackboneLoading("x".into()), Code::Unavailable),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::Inference("boom".into()), Code::Internal),
            (Error::Internal("task died".into()), Code::Internal),
            (Error::Storage("disk".into()), Code::Internal),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::Unimplemented("x".into()), Code::Unimplemented),
            (Error::LimitExceeded("x".into()), Code::ResourceExhausted),
            (Error::Cancelled("x".into()), Code::Cancelled),
            (Error::TimedOut("x".into()), Code::DeadlineExceeded),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
        let status = Status::from(Error::InvalidInput {
            index: 3,
            reason: "text is empty".into(),
        });
        assert_eq!(status.message(), "input 3: text is empty");
    }

    #[test]
    fn server_faults_keep_their_details_from_the_client() {
        let status = Status::from(Error::Storage(
            "cannot write /srv/heads/x/1: disk full".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), INTERNAL_MESSAGE);
        let detail = status
            .metadata()
            .get(DETAIL_HEADER)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(detail, "head store: cannot write /srv/heads/x/1: disk full");
        let status = Status::from(Error::Internal("caf\u{e9}\n".into()));
        let detail = status
            .metadata()
            .get(DETAIL_HEADER)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(detail, "internal error: caf%C3%A9%0A");
    }

    #[test]
    fn long_messages_are_cut() {
        let status = Status::from(Error::BackboneNotFound("é".repeat(100_000)));
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS + 3);
        assert!(status.message().ends_with("..."));
    }

    #[test]
    fn code_names_round_trip_through_numbers() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            assert_eq!(code as i32, n);
            assert!(code_name(code)
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_'));
        }
    }
}
