//! Handlers and the processed-events store that makes them idempotent.
//!
//! - `projection`: a read model of sessions per user (active count, last
//!   seen), the CQRS read side; its writes and the processed mark commit in
//!   ONE MongoDB transaction, so the effect is exactly once;
//! - `webhook`: HTTP POST of the event as JSON with `Idempotency-Key: <eventId>`;
//!   non-2xx or a timeout is a failure; marked processed after success;
//! - `log`: logs the event; marked processed.

use std::time::Duration;

use futures::FutureExt;
use mongodb::{
    Client, Collection, Database,
    bson::{DateTime, Document, doc},
};

use super::decode::DecodedEvent;
use crate::{db::is_duplicate_key, processed::ProcessedStore};

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already processed by this group: skipped.
    Duplicate,
}

/// A handler failure; retried with backoff, then dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

pub enum Handler {
    Projection { client: Client, read_model: Collection<Document> },
    Webhook { http: reqwest::Client, url: String },
    Log,
}

/// The projection's read-model update for one event (pure): the filter and
/// update on `session_projection`, keyed by user id. Unknown events: `None`.
pub fn projection_update(e: &DecodedEvent) -> Option<(Document, Document)> {
    let payload = e.json.get("payload")?;
    let user = payload.get("userId")?.as_str()?;
    let millis = |k: &str| payload.get(k).and_then(|v| v.as_i64()).map(DateTime::from_millis);
    let filter = doc! {"_id": user};
    let update = match e.event_name.as_str() {
        "SessionCreated" => doc! {
            "$inc": {"activeSessions": 1, "sessionsCreated": 1},
            "$max": {"lastSeenAt": millis("createdAt")?},
            "$set": {"lastAuthMethod": payload.get("authMethod").and_then(|v| v.as_str()).unwrap_or("password")},
        },
        "SessionRefreshed" => doc! {
            "$max": {"lastSeenAt": e.json.get("occurredOn").and_then(|v| v.as_i64()).map(DateTime::from_millis)?},
            "$inc": {"refreshes": 1},
        },
        "SessionEnded" => doc! {"$inc": {"activeSessions": -1}, "$max": {"lastSeenAt": millis("endedAt")?}},
        _ => return None,
    };
    Some((filter, update))
}

impl Handler {
    pub fn projection(client: Client, db: &Database) -> Self {
        Handler::Projection { client, read_model: db.collection("session_projection") }
    }

    pub fn webhook(url: &str, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder().timeout(timeout).build().map_err(|e| format!("webhook client: {e}"))?;
        Ok(Handler::Webhook { http, url: url.to_owned() })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Handler::Projection { .. } => "projection",
            Handler::Webhook { .. } => "webhook",
            Handler::Log => "log",
        }
    }

    /// Apply `e` once for `store`'s group.
    pub async fn apply(&self, e: &DecodedEvent, store: &ProcessedStore) -> Result<Applied, HandlerError> {
        let mongo = |err: mongodb::error::Error| HandlerError(format!("MongoDB: {err}"));
        match self {
            Handler::Projection { client, read_model } => {
                let mark = store.mark_document(&e.event_id, &e.event_name);
                let update = projection_update(e);
                let mut session = client.start_session().await.map_err(mongo)?;
                let result = session
                    .start_transaction()
                    .and_run((store, read_model, &mark, &update), |s, (store, read_model, mark, update)| {
                        async move {
                            store.collection().insert_one(*mark).session(&mut *s).await?;
                            if let Some((filter, update)) = update {
                                read_model
                                    .update_one(filter.clone(), update.clone())
                                    .upsert(true)
                                    .session(&mut *s)
                                    .await?;
                            }
                            Ok(())
                        }
                        .boxed()
                    })
                    .await;
                match result {
                    Ok(()) => Ok(Applied::Applied),
                    Err(err) if is_duplicate_key(&err) => Ok(Applied::Duplicate),
                    Err(err) => Err(mongo(err)),
                }
            }
            Handler::Webhook { http, url } => {
                if store.is_processed(&e.event_id).await.map_err(mongo)? {
                    return Ok(Applied::Duplicate);
                }
                let response = http
                    .post(url)
                    .header("Idempotency-Key", &e.event_id)
                    .json(&e.json)
                    .send()
                    .await
                    .map_err(|err| HandlerError(format!("webhook {url}: {err}")))?;
                if !response.status().is_success() {
                    return Err(HandlerError(format!("webhook {url} answered {}", response.status())));
                }
                store.mark(&e.event_id, &e.event_name).await.map_err(mongo)?;
                Ok(Applied::Applied)
            }
            Handler::Log => {
                if !store.mark(&e.event_id, &e.event_name).await.map_err(mongo)? {
                    return Ok(Applied::Duplicate);
                }
                tracing::info!(event_id = %e.event_id, event = %e.event_name, aggregate_id = %e.aggregate_id,
                    payload = %e.json["payload"], "event");
                Ok(Applied::Applied)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, payload: serde_json::Value) -> DecodedEvent {
        DecodedEvent {
            event_id: "e1".into(),
            event_name: name.into(),
            aggregate_id: "s1".into(),
            reader_version: 1,
            json: json!({"eventId": "e1", "occurredOn": 1_700_000_000_500_i64, "payload": payload}),
        }
    }

    #[test]
    fn projection_updates_per_event() {
        let (f, u) = projection_update(&event(
            "SessionCreated",
            json!({"userId": "u1", "createdAt": 1_700_000_000_000_i64, "authMethod": "sso"}),
        ))
        .unwrap();
        assert_eq!(f, doc! {"_id": "u1"});
        assert_eq!(u.get_document("$inc").unwrap().get_i32("activeSessions").unwrap(), 1);
        assert_eq!(u.get_document("$set").unwrap().get_str("lastAuthMethod").unwrap(), "sso");
        let (_, u) = projection_update(&event("SessionEnded", json!({"userId": "u1", "endedAt": 5_i64}))).unwrap();
        assert_eq!(u.get_document("$inc").unwrap().get_i32("activeSessions").unwrap(), -1);
        let (_, u) = projection_update(&event("SessionRefreshed", json!({"userId": "u1"}))).unwrap();
        assert_eq!(
            u.get_document("$max").unwrap().get_datetime("lastSeenAt").unwrap().timestamp_millis(),
            1_700_000_000_500
        );
        assert!(projection_update(&event("Unknown", json!({"userId": "u1"}))).is_none());
        assert!(projection_update(&event("SessionCreated", json!({}))).is_none());
    }
}
