//! One cancellation token for the whole process, and the task tracker that drains on it.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's shutdown tree. Every long-lived task is spawned on `tracker` and watches
/// `token`; `drain` cancels and waits for all of them.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// The root token, cancelled by `drain` (or on a signal, after `cancel_on_signal`); tasks
    /// watch it or a child of it.
    pub token: CancellationToken,
    /// Where long-lived tasks are spawned, so that `drain` can wait for them.
    pub tracker: TaskTracker,
}

impl Shutdown {
    /// A new tree: the token not cancelled, the tracker open and empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the token on SIGTERM or Ctrl-C.
    pub fn cancel_on_signal(&self) {
        cancel_on_signal(self.token.clone());
    }

    /// Cancels everything and waits for every tracked task to finish.
    pub async fn drain(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining");
        token.cancel();
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
