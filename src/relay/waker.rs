//! Wake the relay as soon as rows are inserted: a change stream on the
//! outbox (inserts only), its resume token persisted in `outbox_relay_state`
//! so a restarted relay continues where it stopped. The poll interval stays
//! the fallback: a lost wake-up only delays, never loses, an event.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use mongodb::{
    Collection, Database,
    bson::{DateTime, Document, doc},
    change_stream::event::ResumeToken,
};
use tokio::sync::Notify;

use crate::lifecycle::{self, Stop, stopped};

const TOKEN_SAVE_INTERVAL: Duration = Duration::from_secs(2);

async fn load_token(state: &Collection<Document>, key: &str) -> Option<ResumeToken> {
    let d = state.find_one(doc! {"_id": key}).await.ok()??;
    let raw = d.get("resumeToken")?.clone();
    mongodb::bson::from_bson(raw).ok()
}

async fn save_token(state: &Collection<Document>, key: &str, token: &ResumeToken) {
    let Ok(raw) = mongodb::bson::to_bson(token) else { return };
    let r = state
        .update_one(doc! {"_id": key}, doc! {"$set": {"resumeToken": raw, "savedAt": DateTime::now()}})
        .upsert(true)
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "saving change stream resume token");
    }
}

/// Watch inserts into `outbox` until `shutdown`, notifying `wake` on each.
pub async fn watch_inserts(db: Database, outbox: String, wake: Arc<Notify>, mut shutdown: Stop) {
    let coll = db.collection::<Document>(&outbox);
    let state = db.collection::<Document>("outbox_relay_state");
    let key = format!("{outbox}/change-stream");
    let mut token = load_token(&state, &key).await;
    while !stopped(&shutdown) {
        let pipeline = [doc! {"$match": {"operationType": "insert"}}];
        let mut opened = coll.watch().pipeline(pipeline.clone());
        if let Some(t) = token.clone() {
            opened = opened.resume_after(t);
        }
        let mut stream = match opened.await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, resumed = token.is_some(), "change stream could not open; polling meanwhile");
                // A token too old for the oplog cannot resume: start afresh.
                token = None;
                lifecycle::sleep_or_stop(&mut shutdown, Duration::from_secs(5)).await;
                continue;
            }
        };
        let mut last_save = tokio::time::Instant::now();
        let mut unsaved = false;
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(_)) => {
                        wake.notify_one();
                        // Only read the token after a completed `next()`:
                        // the driver refuses it while a read is in flight.
                        token = stream.resume_token().or(token);
                        unsaved = true;
                        if last_save.elapsed() >= TOKEN_SAVE_INTERVAL && let Some(t) = &token {
                            save_token(&state, &key, t).await;
                            last_save = tokio::time::Instant::now();
                            unsaved = false;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "change stream failed; reopening");
                        break;
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
        if unsaved && let Some(t) = &token {
            save_token(&state, &key, t).await;
        }
    }
}
