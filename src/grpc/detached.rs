//! Runs a mutation in a task of its own, so a client that disconnects cannot cancel it
//! half-way between taking a place (or the authority lock) and making the change
//! durable. The one place handlers spawn a mutation; blocking reads (a citizen's
//! bookings, a backup) go to `spawn_blocking`.

use std::future::Future;

use tonic::Status;

/// The engine's outcome of `work`; `Err(Status)` only if the task itself failed (a panic
/// in the engine: nothing half-applied is acknowledged, and a retry with the same
/// `request_id` is answered at most once).
pub async fn detached<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work).await.map_err(|join_error| {
        tracing::error!(%join_error, "a mutation task failed");
        Status::internal(
            "the request failed inside the server; retry it (with the same request_id, if it has one)",
        )
    })
}
