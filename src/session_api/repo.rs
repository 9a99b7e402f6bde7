//! Persistence of the Session aggregate: the session document and its outbox
//! rows are written in ONE MongoDB transaction (retried by the driver on
//! TransientTransactionError), with optimistic concurrency on `version`.

use crate::db::is_duplicate_key;
use chrono::{DateTime, Utc};
use futures::{FutureExt, TryStreamExt};
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{self, Bson, Document, doc},
    options::{FindOptions, IndexOptions},
};

use crate::{
    domain::{
        event::EventEnvelope,
        session::{ClientInfo, EndReason, Session, SessionStatus},
    },
    outbox::{Outbox, OutboxDocument},
};

/// How long an Idempotency-Key is remembered.
pub const IDEMPOTENCY_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// Another writer changed the session first.
    #[error("session {id} was changed concurrently (expected version {expected})")]
    Conflict { id: String, expected: u64 },
    /// The Idempotency-Key was already used; the caller replays it.
    #[error("idempotency key already used")]
    DuplicateIdempotencyKey,
    #[error("stored session {0} is unreadable: {1}")]
    Corrupt(String, String),
    #[error("encoding outbox rows: {0}")]
    Encode(String),
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// A remembered Idempotency-Key: the request it came with, the session it
/// created and the response it got (what a retry is answered with).
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub request: Document,
    pub session_id: String,
    /// Absent in records written before it was kept.
    pub response: Option<FirstResponse>,
}

/// The first response to a keyed create: its JSON body and the session
/// version it carried (the ETag).
#[derive(Debug, Clone, PartialEq)]
pub struct FirstResponse {
    pub body: String,
    pub version: u64,
}

#[derive(Clone)]
pub struct SessionRepo {
    client: Client,
    sessions: Collection<Document>,
    idempotency: Collection<Document>,
    outbox: Outbox,
    buckets: u32,
}

/// Raised inside a transaction to abort it with a conflict.
#[derive(Debug)]
struct VersionMismatch;

fn dt(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn status_str(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Active => "active",
        SessionStatus::Expired => "expired",
        SessionStatus::Ended => "ended",
    }
}

fn reason_str(r: EndReason) -> &'static str {
    match r {
        EndReason::Logout => "logout",
        EndReason::Revoked => "revoked",
    }
}

/// The stored form of a session.
pub fn session_document(s: &Session) -> Document {
    doc! {
        "_id": &s.id,
        "userId": &s.user_id,
        "device": s.client.device.clone(),
        "userAgent": s.client.user_agent.clone(),
        "createdAt": dt(s.created_at),
        "expiresAt": dt(s.expires_at),
        "status": status_str(s.status),
        "endedAt": s.ended_at.map(dt),
        "endReason": s.end_reason.map(reason_str),
        "refreshCount": i64::from(s.refresh_count),
        "version": i64::try_from(s.version).unwrap_or(i64::MAX),
    }
}

fn parse_session(d: &Document) -> Result<Session, String> {
    let text = |k: &str| d.get_str(k).map(str::to_owned).map_err(|e| format!("{k}: {e}"));
    let opt_text = |k: &str| match d.get(k) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{k}: unexpected {other:?}")),
    };
    let time = |k: &str| {
        d.get_datetime(k).map_err(|e| format!("{k}: {e}")).and_then(|t| {
            DateTime::from_timestamp_millis(t.timestamp_millis()).ok_or_else(|| format!("{k}: out of range"))
        })
    };
    let status = match text("status")?.as_str() {
        "active" => SessionStatus::Active,
        "ended" => SessionStatus::Ended,
        other => return Err(format!("status: unknown '{other}'")),
    };
    let end_reason = match opt_text("endReason")?.as_deref() {
        None => None,
        Some("logout") => Some(EndReason::Logout),
        Some("revoked") => Some(EndReason::Revoked),
        Some(other) => return Err(format!("endReason: unknown '{other}'")),
    };
    let ended_at = match d.get("endedAt") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(time("endedAt")?),
    };
    let int = |k: &str| d.get_i64(k).map_err(|e| format!("{k}: {e}"));
    Ok(Session {
        id: text("_id")?,
        user_id: text("userId")?,
        client: ClientInfo { device: opt_text("device")?, user_agent: opt_text("userAgent")? },
        created_at: time("createdAt")?,
        expires_at: time("expiresAt")?,
        status,
        ended_at,
        end_reason,
        refresh_count: u32::try_from(int("refreshCount")?).map_err(|e| e.to_string())?,
        version: u64::try_from(int("version")?).map_err(|e| e.to_string())?,
    })
}

impl SessionRepo {
    pub fn new(client: Client, db: &Database, outbox_collection: &str, buckets: u32) -> Self {
        Self {
            client,
            sessions: db.collection("sessions"),
            idempotency: db.collection("idempotency_keys"),
            outbox: Outbox::new(db, outbox_collection),
            buckets,
        }
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Collections and indexes this context needs (idempotent).
    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        self.outbox.ensure_indexes().await?;
        self.sessions.create_index(IndexModel::builder().keys(doc! {"userId": 1, "createdAt": -1}).build()).await?;
        let ttl = IndexOptions::builder().name("retention".to_owned()).expire_after(IDEMPOTENCY_RETENTION).build();
        self.idempotency.create_index(IndexModel::builder().keys(doc! {"createdAt": 1}).options(ttl).build()).await?;
        Ok(())
    }

    pub async fn ping(&self) -> mongodb::error::Result<()> {
        self.client.database("admin").run_command(doc! {"ping": 1}).await.map(|_| ())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Session>, RepoError> {
        match self.sessions.find_one(doc! {"_id": id}).await? {
            None => Ok(None),
            Some(d) => parse_session(&d).map(Some).map_err(|e| RepoError::Corrupt(id.to_owned(), e)),
        }
    }

    /// A user's sessions, newest first.
    pub async fn by_user(&self, user_id: &str, limit: i64) -> Result<Vec<Session>, RepoError> {
        let options = FindOptions::builder().sort(doc! {"createdAt": -1}).limit(limit).build();
        let docs: Vec<Document> =
            self.sessions.find(doc! {"userId": user_id}).with_options(options).await?.try_collect().await?;
        docs.iter()
            .map(|d| parse_session(d).map_err(|e| RepoError::Corrupt(format!("{:?}", d.get("_id")), e)))
            .collect()
    }

    pub async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, RepoError> {
        let Some(d) = self.idempotency.find_one(doc! {"_id": key}).await? else { return Ok(None) };
        let corrupt =
            |e: bson::document::ValueAccessError| RepoError::Corrupt(format!("idempotency key {key}"), e.to_string());
        let response = match (d.get_str("response"), d.get_i64("responseVersion")) {
            (Ok(body), Ok(version)) => {
                Some(FirstResponse { body: body.to_owned(), version: u64::try_from(version).unwrap_or(0) })
            }
            _ => None,
        };
        Ok(Some(IdempotencyRecord {
            key: key.to_owned(),
            request: d.get_document("request").map_err(corrupt)?.clone(),
            session_id: d.get_str("sessionId").map_err(corrupt)?.to_owned(),
            response,
        }))
    }

    /// The outbox rows of `events`, stamped with the version the session
    /// has after this write.
    fn rows(&self, events: &[EventEnvelope], version: u64) -> Result<Vec<OutboxDocument>, RepoError> {
        events
            .iter()
            .map(|e| {
                OutboxDocument::new(e, self.buckets)
                    .map(|row| row.at_version(version))
                    .map_err(|err| RepoError::Encode(err.to_string()))
            })
            .collect()
    }

    /// Insert a new session with its events (and its Idempotency-Key, if
    /// any) in one transaction. Returns the number of transaction attempts.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.kind = "client", db.system.name = "mongodb",
        db.operation.name = "insert session and outbox events", outbox.events = events.len()))]
    pub async fn insert(
        &self,
        session: &Session,
        events: &[EventEnvelope],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<u32, RepoError> {
        let rows = self.rows(events, session.version)?;
        let session_doc = session_document(session);
        let idem_doc = idempotency.map(|r| {
            let mut d = doc! {"_id": &r.key, "request": r.request.clone(), "sessionId": &r.session_id,
            "createdAt": bson::DateTime::now()};
            if let Some(first) = &r.response {
                d.insert("response", &first.body);
                d.insert("responseVersion", i64::try_from(first.version).unwrap_or(i64::MAX));
            }
            d
        });
        let mut attempts = 0u32;
        let mut tx = self.client.start_session().await?;
        let result = tx
            .start_transaction()
            .and_run(
                (self, &session_doc, &rows, &idem_doc, &mut attempts),
                |tx, (repo, session_doc, rows, idem, attempts)| {
                    async move {
                        **attempts += 1;
                        if let Some(idem) = idem {
                            repo.idempotency.insert_one(idem).session(&mut *tx).await?;
                        }
                        repo.sessions.insert_one(*session_doc).session(&mut *tx).await?;
                        repo.outbox.append(tx, rows).await
                    }
                    .boxed()
                },
            )
            .await;
        match result {
            Ok(()) => Ok(attempts),
            Err(e) if idempotency.is_some() && is_duplicate_key(&e) => {
                // Tell a reused key from any other duplicate by looking it up.
                match self.find_idempotency(&idempotency.expect("checked").key).await? {
                    Some(_) => Err(RepoError::DuplicateIdempotencyKey),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replace the session if its stored version is still `expected`, and
    /// append its events, in one transaction. Returns the number of attempts.
    #[tracing::instrument(name = "transaction", skip_all, fields(otel.kind = "client", db.system.name = "mongodb",
        db.operation.name = "replace session and insert outbox events", outbox.events = events.len()))]
    pub async fn update(&self, session: &Session, expected: u64, events: &[EventEnvelope]) -> Result<u32, RepoError> {
        let rows = self.rows(events, session.version)?;
        let session_doc = session_document(session);
        let filter = doc! {"_id": &session.id, "version": i64::try_from(expected).unwrap_or(i64::MAX)};
        let mut attempts = 0u32;
        let mut tx = self.client.start_session().await?;
        let result = tx
            .start_transaction()
            .and_run(
                (self, &filter, &session_doc, &rows, &mut attempts),
                |tx, (repo, filter, session_doc, rows, attempts)| {
                    async move {
                        **attempts += 1;
                        let replaced =
                            repo.sessions.replace_one((*filter).clone(), *session_doc).session(&mut *tx).await?;
                        if replaced.matched_count == 0 {
                            return Err(mongodb::error::Error::custom(VersionMismatch));
                        }
                        repo.outbox.append(tx, rows).await
                    }
                    .boxed()
                },
            )
            .await;
        match result {
            Ok(()) => Ok(attempts),
            Err(e) if e.get_custom::<VersionMismatch>().is_some() => {
                Err(RepoError::Conflict { id: session.id.clone(), expected })
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::session::{CreateSession, SessionPolicy};

    #[test]
    fn session_documents_round_trip() {
        let now = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let (mut s, _) = Session::create(
            CreateSession { user_id: "u".into(), ttl_seconds: None, client: ClientInfo::default() },
            &SessionPolicy::default(),
            now,
        )
        .unwrap();
        assert_eq!(parse_session(&session_document(&s)).unwrap(), s);
        s.end(EndReason::Revoked, now).unwrap();
        assert_eq!(parse_session(&session_document(&s)).unwrap(), s);
    }
}
