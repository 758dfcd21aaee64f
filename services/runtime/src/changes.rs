//! In-process change notifications: a projector announces the media ids whose read models it
//! just committed, and a query edge in the same process drops its cached responses for them.
//! A query edge in another process tails the log instead (see the query crate).

use tokio::sync::broadcast;
use uuid::Uuid;

/// The channel of change notices within one process: a broadcast of media ids, holding the
/// last 16 384 for subscribers that fall behind. Clones share the channel.
#[derive(Clone)]
pub struct Changes {
    sender: broadcast::Sender<Uuid>,
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

impl Changes {
    /// A new channel with no subscribers.
    pub fn new() -> Self {
        Changes {
            sender: broadcast::channel(16_384).0,
        }
    }

    /// Announces that `media_id`'s read models changed. Never blocks or fails; with no
    /// subscriber the notice is dropped.
    pub fn publish(&self, media_id: Uuid) {
        // No subscriber is fine: nothing is cached.
        let _ = self.sender.send(media_id);
    }

    /// A receiver of every notice published from now on. One that falls more than 16 384
    /// notices behind gets `RecvError::Lagged` and has missed some, so it should drop
    /// everything it cached.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }
}
