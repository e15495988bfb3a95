//! Blocking work off the async runtime, with one meaning for a task that dies.

use crate::{Error, Result};

/// Runs `work` on tokio's blocking pool. A panic inside it (a bug) becomes
/// [`Error::Internal`] naming `what`, the same everywhere.
pub async fn run_blocking<T, F>(what: &'static str, work: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| Error::Internal(format!("{what} failed: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_an_internal_error() {
        assert_eq!(run_blocking("adding", || 1 + 1).await.unwrap(), 2);
        let err = run_blocking("exploding", || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Internal(m) if m.starts_with("exploding failed")),
            "{err}"
        );
    }
}
