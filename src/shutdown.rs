//! The process's stop sequence as one small handle: `stop_accepting` ends accept loops,
//! `cut` ends live tunnels once the drain grace period is over, and the tracker knows every
//! task that must end before the log is flushed.

use std::future::Future;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerWaitFuture;

/// Cheap to clone: every clone is the same stop sequence.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    stop_accepting: CancellationToken,
    cut: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves when listeners must stop accepting (SIGTERM).
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop_accepting.cancelled()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Resolves when draining is over and live tunnels must close.
    pub fn cutting(&self) -> WaitForCancellationFuture<'_> {
        self.cut.cancelled()
    }

    /// The token every tunnel token descends from (the kill switch's parent).
    pub fn cut_token(&self) -> &CancellationToken {
        &self.cut
    }

    /// Run `fut` as a task the shutdown waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// The tracker itself, for blocking tasks and futures spawned on another handle.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Stop accepting; no new tasks are tracked after this.
    pub fn stop_accepting(&self) {
        self.stop_accepting.cancel();
        self.tracker.close();
    }

    /// Cut every live tunnel now.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Resolves when every tracked task has ended (after [`Shutdown::stop_accepting`]).
    pub fn wait(&self) -> TaskTrackerWaitFuture<'_> {
        self.tracker.wait()
    }
}
