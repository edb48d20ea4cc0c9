//! Waiting for a condition with a deadline, the one way every test does it
//! (never a bare sleep): poll, and fail naming what did not happen in time.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

/// Between two polls: short enough not to slow a test down, long enough
/// not to spin a core the services under test need.
const POLL: Duration = Duration::from_millis(10);

/// Polls `probe` until it returns `Some`, or fails at the deadline.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a plain condition; fails the test (panics) at the
/// deadline, for tests that do not return a `Result`.
pub async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if let Err(e) = eventually(within, what, || std::future::ready(cond().then_some(()))).await {
        panic!("{e}");
    }
}
