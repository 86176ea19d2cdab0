//! Exports (bookings, audit log, campaign registrations, backups) are long scans streamed to a client that may
//! stop reading. Two bounds keep a stalled reader from pinning the server:
//!
//! - [`Exports::admit`]: at most `exports_max` exports at once, `exports_per_token_max`
//!   per token, one backup. The permit lives as long as the response stream, so a
//!   stream the client holds open without reading keeps counting against its own token.
//!   (The stream ends when tonic's encoder has taken its last item: an export small
//!   enough for the encoder's 32 KiB buffer frees its place then, read or not, and
//!   leaves at most that much buffered.)
//! - [`Feed`]: the scan hands each item over waiting at most `export_idle_timeout_ms`
//!   for the reader; past it the scan stops (its blocking thread is free again), the
//!   stream ends with `DEADLINE_EXCEEDED` / `EXPORT_IDLE` after what was buffered, and
//!   `on_idle` runs: the gRPC layer closes the connection, the only way to end a stream
//!   whose client keeps its window shut (and so to free the stream's places).
//!
//! Each item goes out once what its scan had read is durable (`Store::settling`): the
//! committer applies a batch before its fdatasync, and a scan may meet its records
//! meanwhile. The item carries the last batch begun when it was sent, and the stream
//! waits for that batch: while writes commit, about a buffer's worth of items per
//! commit.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;

use crate::service::ServiceError;
use crate::store::committer::Settling;

/// Exports in progress, in total and per token (by the caller's name).
pub struct Exports {
    max: usize,
    per_token_max: usize,
    running: Arc<Mutex<Running>>,
}

#[derive(Default)]
struct Running {
    total: usize,
    per_token: HashMap<String, usize>,
    backups: usize,
}

/// What an export streams: records (bookings, audit entries, registrations), or a backup of the
/// whole store (one at a time: it tees every commit while it scans).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    Records,
    Backup,
}

/// One admitted export; dropping it frees its place.
pub struct ExportPermit {
    token: String,
    kind: ExportKind,
    running: Arc<Mutex<Running>>,
}

impl Exports {
    pub fn new(max: usize, per_token_max: usize) -> Self {
        assert!(max >= 1 && per_token_max >= 1, "checked with the limits");
        Self {
            max,
            per_token_max,
            running: Arc::default(),
        }
    }

    /// A place for one more export by `token`, or `EXPORTS_IN_PROGRESS`.
    pub fn admit(&self, token: &str, kind: ExportKind) -> Result<ExportPermit, ServiceError> {
        let mut running = lock(&self.running);
        let of_token = running.per_token.get(token).copied().unwrap_or(0);
        if kind == ExportKind::Backup && running.backups > 0 {
            // Said as such: "too many exports" sent an operator looking at the limits.
            return Err(crate::store::StoreError::BackupRunning.into());
        }
        if running.total >= self.max || of_token >= self.per_token_max {
            return Err(ServiceError::ExportsInProgress);
        }
        running.total += 1;
        running.per_token.insert(token.to_string(), of_token + 1);
        if kind == ExportKind::Backup {
            running.backups += 1;
        }
        Ok(ExportPermit {
            token: token.to_string(),
            kind,
            running: Arc::clone(&self.running),
        })
    }
}

impl Drop for ExportPermit {
    fn drop(&mut self) {
        let mut running = lock(&self.running);
        running.total -= 1;
        if self.kind == ExportKind::Backup {
            running.backups -= 1;
        }
        let of_token = running
            .per_token
            .get_mut(&self.token)
            .expect("an admitted token is counted");
        *of_token -= 1;
        if *of_token == 0 {
            running.per_token.remove(&self.token);
        }
    }
}

fn lock(running: &Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    // Counts only: a panic elsewhere cannot leave them half-updated.
    running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a scan stopped feeding its stream.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("the client went away")]
    Gone,
    #[error("the client read nothing for export_idle_timeout_ms")]
    Idle,
}

/// What to do when an export's reader stalled past the idle timeout.
pub type OnIdle = Arc<dyn Fn() + Send + Sync>;

/// How handing an item to a watch stream's reader went (see [`send_within`]).
pub enum Sent {
    Delivered,
    /// The reader went away.
    Gone,
    /// The reader read nothing for the idle timeout, or took nothing within a short
    /// grace once shutdown began: cut it off (`OnIdle`).
    Stalled,
    /// The server shuts down and the reader took its item: stop (the reply stream ends
    /// with SHUTTING_DOWN by itself, `grpc::shed`; the connection's other calls are still
    /// answered).
    Closing,
}

/// How long a watch stuck mid-send when shutdown begins may still take its item before
/// it is cut off (its connection closed: a stream whose client keeps its window shut
/// would hold the drain, and the store's clean close, for good).
const SHUTDOWN_SEND_GRACE: Duration = Duration::from_millis(500);

/// Hands `item` to a long stream's reader (a watch), waiting at most `idle`, and once
/// `closing` turns true at most `SHUTDOWN_SEND_GRACE` more. Async: a stalled reader pins
/// no thread.
pub async fn send_within<T>(
    sender: &mpsc::Sender<T>,
    item: T,
    idle: Duration,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) -> Sent {
    let send = tokio::time::timeout(idle, sender.send(item));
    tokio::pin!(send);
    let sent = tokio::select! {
        sent = &mut send => Some(sent),
        _ = closing.wait_for(|closing| *closing) => None,
    };
    let sent = match sent {
        Some(sent) => sent,
        None => match tokio::time::timeout(SHUTDOWN_SEND_GRACE, &mut send).await {
            Ok(Ok(Ok(()))) => return Sent::Closing,
            Ok(sent) => sent,
            Err(_) => return Sent::Stalled,
        },
    };
    match sent {
        Ok(Ok(())) => Sent::Delivered,
        Ok(Err(_)) => Sent::Gone,
        Err(_) => Sent::Stalled,
    }
}

/// The sending end of an export, used from the scan's blocking thread.
pub struct Feed<T> {
    sender: mpsc::Sender<Fed<T>>,
    idle: Duration,
    on_idle: Option<OnIdle>,
    runtime: tokio::runtime::Handle,
    settling: Settling,
}

/// An item, and the last batch begun when it was sent (all it read is in it or before).
type Fed<T> = (u64, Result<T, ServiceError>);

/// An export's items, each once what it read is durable; ends after an error.
pub type FedStream<T> = Pin<Box<dyn Stream<Item = Result<T, ServiceError>> + Send>>;

impl<T: Send + 'static> Feed<T> {
    /// A feed and its stream, `depth` items buffered. Call from the runtime (it
    /// remembers the runtime to wait on from the blocking thread).
    pub fn channel(
        depth: usize,
        idle: Duration,
        on_idle: Option<OnIdle>,
        settling: Settling,
    ) -> (Self, FedStream<T>) {
        let (sender, receiver) = mpsc::channel(depth);
        let runtime = tokio::runtime::Handle::current();
        let stream = settled_stream(receiver, settling.clone());
        let feed = Self {
            sender,
            idle,
            on_idle,
            runtime,
            settling,
        };
        (feed, stream)
    }

    /// Hands `item` over, waiting at most the idle timeout for room. On `Idle` the
    /// stream is ended with `EXPORT_IDLE` once the client reads what is buffered.
    pub fn send(&self, item: Result<T, ServiceError>) -> Result<(), Stopped> {
        let fed = (self.settling.begun(), item);
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.idle, self.sender.send(fed)));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stopped::Gone),
            Err(_) => {
                self.fail(ServiceError::ExportIdle);
                if let Some(on_idle) = &self.on_idle {
                    on_idle();
                }
                Err(Stopped::Idle)
            }
        }
    }

    /// Ends the stream with `error` after what is buffered, without waiting: an async
    /// task (no thread) waits for room, or for the client to go.
    pub fn fail(&self, error: ServiceError) {
        let sender = self.sender.clone();
        self.runtime.spawn(async move {
            let _ = sender.send((0, Err(error))).await;
        });
    }
}

/// The items of `receiver`, each once its batch is durable; a failed store ends the
/// stream with its refusal.
fn settled_stream<T: Send + 'static>(
    receiver: mpsc::Receiver<Fed<T>>,
    settling: Settling,
) -> FedStream<T> {
    let state = (receiver, settling, false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut receiver, settling, ended)| async move {
            if ended {
                return None;
            }
            let (batch, item) = receiver.recv().await?;
            let item = match settling.until(batch).await {
                Ok(()) => item,
                Err(failed) => Err(ServiceError::from(failed)),
            };
            let ended = item.is_err();
            Some((item, (receiver, settling, ended)))
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::committer::CommitterState;
    use futures::StreamExt;

    /// A store's settling with no batch begun: items go out at once.
    fn nothing_in_flight() -> Settling {
        Settling::of(&Arc::new(CommitterState::new(0)))
    }

    #[test]
    fn exports_are_capped_in_total_and_per_token_and_freed_on_drop() {
        use ExportKind::{Backup, Records};
        let exports = Exports::new(3, 2);
        let a1 = exports.admit("a", Records).unwrap();
        let _a2 = exports.admit("a", Records).unwrap();
        assert!(matches!(
            exports.admit("a", Records),
            Err(ServiceError::ExportsInProgress)
        ));
        let b1 = exports.admit("b", Backup).unwrap();
        assert!(exports.admit("c", Records).is_err(), "three in total");
        drop(a1);
        let second = exports
            .admit("c", Backup)
            .err()
            .expect("one backup at a time");
        assert!(second.to_string().contains("another backup is running"));
        drop(b1);
        let _c1 = exports.admit("c", Backup).unwrap();
        let _a3 = exports.admit("a", Records).unwrap();
        assert!(exports.admit("d", Records).is_err(), "three in total again");
    }

    #[tokio::test]
    async fn a_feed_gives_up_on_a_reader_that_takes_nothing() {
        let idled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let on_idle: OnIdle = {
            let idled = Arc::clone(&idled);
            Arc::new(move || idled.store(true, std::sync::atomic::Ordering::Release))
        };
        let idle = Duration::from_millis(50);
        let (feed, mut stream) = Feed::<u32>::channel(1, idle, Some(on_idle), nothing_in_flight());
        let fed = tokio::task::spawn_blocking(move || (feed.send(Ok(1)), feed.send(Ok(2))))
            .await
            .unwrap();
        assert_eq!(fed, (Ok(()), Err(Stopped::Idle)));
        assert!(idled.load(std::sync::atomic::Ordering::Acquire));
        assert!(matches!(stream.next().await, Some(Ok(1))));
        assert!(matches!(
            stream.next().await,
            Some(Err(ServiceError::ExportIdle))
        ));
        assert!(stream.next().await.is_none());
    }
}
