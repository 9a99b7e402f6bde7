//! Handlers and the processed-events store that makes them idempotent.
//!
//! - `projection`: a read model of sessions per user (active count, last
//!   seen), the CQRS read side; its writes and the processed marks commit in
//!   ONE MongoDB transaction (per batch of records), so the effect is
//!   exactly once;
//! - `webhook`: HTTP POST of the event as a CloudEvent (see `webhook`),
//!   with `Idempotency-Key: <eventId>`, signed when a secret is given;
//!   non-2xx or a timeout is a failure; marked processed after success
//!   (by the consumer, one bulk write per round);
//! - `log`: logs the event; marked processed likewise.

use std::{collections::HashSet, time::Duration};

use futures::{FutureExt, TryStreamExt};
use mongodb::{
    Client, Collection, Database,
    bson::{DateTime, Document, doc},
};

use super::{decode::DecodedEvent, ordering::reason, webhook::Webhook};
use crate::{db::is_duplicate_key, processed::ProcessedStore};

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already processed by this group: skipped.
    Duplicate,
}

/// A handler failure. A transient one (MongoDB or the webhook unreachable,
/// a timeout, a 5xx, 408 or 429 answer) is retried without limit: the event
/// is fine and waits for the outage to end. Any other is a rejection of the
/// event, retried up to the attempt budget, then dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// Why it waits, when transient: a metric label (`mongodb`, `webhook`).
    pub transient: Option<&'static str>,
    /// How long the other side asked to be left alone (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl HandlerError {
    pub fn transient(reason: &'static str, message: String) -> Self {
        Self { message, transient: Some(reason), retry_after: None }
    }

    pub fn rejected(message: String) -> Self {
        Self { message, transient: None, retry_after: None }
    }

    pub fn with_retry_after(self, retry_after: Option<Duration>) -> Self {
        Self { retry_after, ..self }
    }
}

/// MongoDB failed: an outage, waited out.
fn mongo_unavailable(err: mongodb::error::Error) -> HandlerError {
    HandlerError::transient(reason::MONGODB, format!("MongoDB: {err}"))
}

pub enum Handler {
    Projection { client: Client, read_model: Collection<Document> },
    Webhook(Webhook),
    Log,
}

/// The projection's read-model update for one event (pure): the filter and
/// update on the read model (`session_projection`), keyed by user id. Unknown events: `None`.
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
    /// The projection, writing `collection` (a generation of the read
    /// model, see `generations`).
    pub fn projection(client: Client, db: &Database, collection: &str) -> Self {
        Handler::Projection { client, read_model: db.collection(collection) }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Handler::Projection { .. } => "projection",
            Handler::Webhook(_) => "webhook",
            Handler::Log => "log",
        }
    }

    /// Whether it records events as processed itself, in one MongoDB
    /// transaction with its writes, and applies batches that way (the
    /// projection). The others have an effect outside MongoDB (a webhook
    /// call, a log line): the caller checks the processed-events store
    /// before them and records what they applied after.
    pub fn is_transactional(&self) -> bool {
        matches!(self, Handler::Projection { .. })
    }

    /// Apply a batch of events once each for `store`'s group, in order,
    /// with the outcome of each: the projection finds the batch's
    /// duplicates with one query and writes its updates and processed marks
    /// in one transaction, so all of the batch takes effect, or none of it.
    /// Other handlers (not `is_transactional`) apply event by event and
    /// stop at the first failure.
    pub async fn apply_batch(
        &self,
        events: &[DecodedEvent],
        store: &ProcessedStore,
    ) -> Result<Vec<Applied>, HandlerError> {
        let Handler::Projection { client, read_model } = self else {
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                out.push(self.apply(e, store).await?);
            }
            return Ok(out);
        };
        let mut session = client.start_session().await.map_err(mongo_unavailable)?;
        let mut tries = 0;
        loop {
            tries += 1;
            session.start_transaction().await.map_err(mongo_unavailable)?;
            let attempt = project_batch(events, store, read_model, &mut session).await;
            let result = match attempt {
                Ok(applied) => session.commit_transaction().await.map(|()| applied),
                Err(e) => {
                    let _ = session.abort_transaction().await;
                    Err(e)
                }
            };
            match result {
                Ok(applied) => return Ok(applied),
                // A write conflict (another consumer, or the open
                // transaction of one that was killed, until MongoDB expires
                // it): a few quick tries, then the caller's backoff.
                Err(e)
                    if tries < BATCH_TRIES
                        && (e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
                            || e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT)) =>
                {
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                Err(e) => return Err(mongo_unavailable(e)),
            }
        }
    }

    /// Apply `e`: the projection once for `store`'s group (it checks and
    /// records it in its transaction); the others once more (the caller
    /// checks and records, see `is_transactional`).
    pub async fn apply(&self, e: &DecodedEvent, store: &ProcessedStore) -> Result<Applied, HandlerError> {
        match self {
            Handler::Projection { client, read_model } => {
                let mark = store.mark_document(&e.event_id, &e.event_name);
                let update = projection_update(e);
                let mut session = client.start_session().await.map_err(mongo_unavailable)?;
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
                    Err(err) => Err(mongo_unavailable(err)),
                }
            }
            Handler::Webhook(webhook) => {
                webhook.deliver(e).await?;
                Ok(Applied::Applied)
            }
            Handler::Log => {
                tracing::info!(event_id = %e.event_id, event = %e.event_name, aggregate_id = %e.aggregate_id,
                    payload = %e.json["payload"], "event");
                Ok(Applied::Applied)
            }
        }
    }
}

/// Tries of a batch's transaction on a transient transaction error.
const BATCH_TRIES: u64 = 3;

/// Statements per `update` command.
const UPDATES_PER_COMMAND: usize = 1000;

/// The projection's writes for a batch, inside the caller's transaction:
/// which events are already processed (one query), then the processed
/// marks and the read-model updates of the others, in order.
async fn project_batch(
    events: &[DecodedEvent],
    store: &ProcessedStore,
    read_model: &Collection<Document>,
    session: &mut mongodb::ClientSession,
) -> mongodb::error::Result<Vec<Applied>> {
    let keys: Vec<String> = events.iter().map(|e| store.key(&e.event_id)).collect();
    let mut done: HashSet<String> = store
        .collection()
        .find(doc! {"_id": {"$in": &keys}})
        .projection(doc! {"_id": 1})
        .session(&mut *session)
        .await?
        .stream(&mut *session)
        .try_collect::<Vec<Document>>()
        .await?
        .into_iter()
        .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
        .collect();
    let mut applied = Vec::with_capacity(events.len());
    let mut marks = Vec::new();
    let mut updates = Vec::new();
    for (e, key) in events.iter().zip(keys) {
        // A duplicate in the store, or twice in this batch.
        if !done.insert(key) {
            applied.push(Applied::Duplicate);
            continue;
        }
        marks.push(store.mark_document(&e.event_id, &e.event_name));
        if let Some((filter, update)) = projection_update(e) {
            updates.push(doc! {"q": filter, "u": update, "upsert": true});
        }
        applied.push(Applied::Applied);
    }
    if !marks.is_empty() {
        store.collection().insert_many(marks).session(&mut *session).await?;
    }
    for chunk in updates.chunks(UPDATES_PER_COMMAND) {
        let reply = read_model
            .client()
            .database(read_model.namespace().db.as_str())
            .run_command(doc! {"update": read_model.name(), "updates": chunk, "ordered": true})
            .session(&mut *session)
            .await?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && !errors.is_empty()
        {
            return Err(mongodb::error::Error::custom(format!("read-model update refused: {errors:?}")));
        }
    }
    Ok(applied)
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
            reader_version: Some(1),
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
