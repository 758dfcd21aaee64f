//! In-process change notifications: a projector announces the media ids whose read models it
//! just committed, and a query edge in the same process drops its cached responses for them.
//! A query edge in another process tails the log instead (see the query crate).

use tokio::sync::broadcast;
use uuid::Uuid;

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
    pub fn new() -> Self {
        Changes {
            sender: broadcast::channel(16_384).0,
        }
    }

    pub fn publish(&self, media_id: Uuid) {
        // No subscriber is fine: nothing is cached.
        let _ = self.sender.send(media_id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }
}
