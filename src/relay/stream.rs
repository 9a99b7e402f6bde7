//! The outbox's change stream: inserts in commit order (the oplog's), each
//! with the resume token that checkpoints it. Change streams return only
//! majority-committed writes, so an event a failover could roll back is
//! never published.
//!
//! A reader task pulls the stream into a bounded channel (back-pressure:
//! it waits when the relay is behind), so the relay can take a batch with a
//! time limit without cancelling a read in flight. The reader only takes
//! events from the driver; a second task reads each event's row, so the
//! driver asks MongoDB for its next reply as soon as the reader has taken
//! the last event of this one, and MongoDB prepares it while the rows are
//! read and published.

use std::time::Duration;

use mongodb::{
    Collection,
    bson::{Bson, DateTime, Document, RawDocument, RawDocumentBuf, Timestamp, doc},
    change_stream::event::ResumeToken,
    error::ErrorKind,
};
use tokio::{sync::mpsc, time::Instant};

use super::range::AbortOnDrop;
use crate::outbox::{EventRow, Unreadable, bucket::BucketRange};

/// Server errors that mean "this stream cannot resume from that token":
/// ChangeStreamHistoryLost (the position left the oplog), and
/// ChangeStreamFatalError / InvalidResumeToken, which a token older than the
/// oplog's start also produces ("the resume token was not found").
const CANNOT_RESUME: [i32; 3] = [286, 280, 260];

/// Server replies each of the stream's two tasks may hold ahead of the next.
const READ_AHEAD: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The checkpoint's token is older than the oplog: recover by a scan.
    #[error("the change stream cannot resume, its position is no longer in the oplog: {0}")]
    HistoryLost(String),
    #[error("change stream: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

fn classify(e: mongodb::error::Error) -> StreamError {
    match e.kind.as_ref() {
        ErrorKind::Command(c) if CANNOT_RESUME.contains(&c.code) => {
            StreamError::HistoryLost(format!("{} ({})", c.message, c.code_name))
        }
        _ => StreamError::Mongo(e),
    }
}

/// Where a stream starts. There is no "now": a stream opened without a
/// position starts at the server's last *applied* write, which can be ahead
/// of what a majority read sees, so a scan paired with it could miss a
/// commit in between. A recovery starts at a majority-committed cluster
/// time instead (see `range::recover`).
#[derive(Debug, Clone)]
pub enum StreamStart {
    /// After the event (or idle position) of this token.
    After(ResumeToken),
    /// At this cluster time, inclusive: how a range resumes from another
    /// range's position (a token of an event another range's filter
    /// dropped is refused by the server; a time is not).
    At(Timestamp),
}

/// One inserted row; a document that is not a readable outbox row comes
/// with its id and the reason.
pub type Row = Result<EventRow, Unreadable>;

enum Read {
    Event(Box<Row>, ResumeToken, Arrival),
    /// No event in the last wait; the stream's position advanced to here.
    Idle(ResumeToken),
}

/// How an event came through the stream, for the relay's per-stage
/// latency (`outbox_relay_stage_seconds`).
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// From its commit (the change event's `wallTime`) until the reader
    /// received it, seconds: the majority commit point and the stream's
    /// await. `None` when the server sent no `wallTime`.
    pub commit_to_read: Option<f64>,
    /// When the reader received it.
    pub read: Instant,
    /// When `next_batch` took it.
    pub taken: Instant,
}

/// One event of the stream.
pub struct StreamEvent {
    pub row: Row,
    pub token: ResumeToken,
    pub arrival: Arrival,
}

/// What one `next_batch` returned.
#[derive(Default)]
pub struct Batch {
    /// Events in commit order.
    pub events: Vec<StreamEvent>,
    /// The newest position with no event after it (idle stream).
    pub idle_token: Option<ResumeToken>,
}

/// What the reader task takes from the driver, for the parser.
enum Unparsed {
    Event(RawDocumentBuf, ResumeToken, Instant),
    Idle(ResumeToken),
}

/// What the reader task sent (`None`: it stopped).
type Received = Option<Result<Read, StreamError>>;

pub struct OutboxStream {
    rx: mpsc::Receiver<Result<Read, StreamError>>,
    /// A message `ready` waited for, first in the next batch.
    ready: Option<Received>,
    /// The parser, which ends the reader when it ends: both end with the
    /// stream.
    _task: AbortOnDrop<()>,
}

/// The row of an insert event, read from the event's bytes: the inserted
/// document's bytes, kept, and its head, read once. An event without its
/// document (which an insert always has) is unreadable under the id its
/// document key names.
fn row_of(event: &RawDocument) -> Row {
    match event.get_document("fullDocument") {
        Ok(document) => EventRow::from_raw(document.to_raw_document_buf()),
        Err(_) => {
            let id = event
                .get_document("documentKey")
                .ok()
                .and_then(|key| key.get("_id").ok().flatten())
                .and_then(|id| Bson::try_from(id.to_raw_bson()).ok())
                .unwrap_or(Bson::Null);
            Err(Unreadable {
                id: Box::new(id),
                aggregate_id: None,
                reason: "the insert event carries no document".into(),
            })
        }
    }
}

impl OutboxStream {
    /// Open the stream of `range`'s inserts from `start`. The server sends
    /// `batch` events per reply; the reader keeps up to `READ_AHEAD`
    /// batches queued, so the next reply is being prepared while the relay
    /// publishes. A start the oplog no longer holds is refused here or by
    /// the first read (`StreamError::HistoryLost` either way).
    pub async fn open(
        coll: Collection<Document>,
        start: StreamStart,
        batch: usize,
        range: BucketRange,
    ) -> Result<Self, StreamError> {
        // Only what the relay reads crosses the wire: the token (`_id`), the
        // operation, the document key, the inserted document and the commit's
        // wall time (for the stage latency), of the range's rows (the server
        // filters; each range's stream still reads the whole oplog).
        let coll = coll.clone_with_type::<RawDocumentBuf>();
        let mut only = doc! {"operationType": "insert"};
        if let Some(f) = range.filter("fullDocument.bucket") {
            only.extend(f);
        }
        let mut watch = coll
            .watch()
            .pipeline([
                doc! {"$match": only},
                doc! {"$project": {"operationType": 1, "documentKey": 1, "fullDocument": 1, "wallTime": 1}},
            ])
            .batch_size(u32::try_from(batch).unwrap_or(u32::MAX))
            .max_await_time(Duration::from_millis(500));
        watch = match start {
            StreamStart::After(t) => watch.resume_after(t),
            StreamStart::At(at) => watch.start_at_operation_time(at),
        };
        // Each event is read from its bytes (`row_of`) rather than through
        // the driver's typed change event, whose every field would be
        // deserialized and allocated only to be dropped.
        let mut stream = watch.await.map_err(classify)?.with_type::<RawDocumentBuf>();
        // The reader takes each event from the driver, nothing more (see
        // the module's doc); the parser below reads its row.
        let (raw_tx, mut raw_rx) = mpsc::channel::<Result<Unparsed, StreamError>>(batch.max(1) * READ_AHEAD);
        let reader = tokio::spawn(async move {
            loop {
                let message = match stream.next_if_any().await {
                    Ok(Some(event)) => {
                        let read = Instant::now();
                        // The token of the event just returned: the driver
                        // keeps it from the event's `_id`.
                        let Some(token) = stream.resume_token() else {
                            let missing = mongodb::error::Error::custom("a change event without its resume token");
                            let _ = raw_tx.send(Err(StreamError::Mongo(missing))).await;
                            return;
                        };
                        Ok(Unparsed::Event(event, token, read))
                    }
                    Ok(None) => match stream.resume_token() {
                        Some(t) => Ok(Unparsed::Idle(t)),
                        None => continue,
                    },
                    Err(e) => Err(classify(e)),
                };
                let failed = message.is_err();
                if raw_tx.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel(batch.max(1) * READ_AHEAD);
        let task = tokio::spawn(async move {
            let _reader = AbortOnDrop(reader);
            while let Some(message) = raw_rx.recv().await {
                let message = message.map(|unparsed| match unparsed {
                    Unparsed::Event(event, token, read) => {
                        let commit_to_read = event.get_datetime("wallTime").ok().map(|committed| {
                            (DateTime::now().timestamp_millis() - committed.timestamp_millis()).max(0) as f64 / 1000.0
                        });
                        let arrival = Arrival { commit_to_read, read, taken: read };
                        Read::Event(Box::new(row_of(&event)), token, arrival)
                    }
                    Unparsed::Idle(token) => Read::Idle(token),
                });
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self { rx, ready: None, _task: AbortOnDrop(task) })
    }

    /// Wait until the stream has something for `next_batch`. Cancel-safe:
    /// what arrived is kept for the next batch.
    pub async fn ready(&mut self) {
        if self.ready.is_none() {
            self.ready = Some(self.rx.recv().await);
        }
    }

    /// Up to `max` events: waits up to `wait` for the first, then takes
    /// what has arrived, waiting up to `linger` more for a fuller batch.
    pub async fn next_batch(&mut self, max: usize, wait: Duration, linger: Duration) -> Result<Batch, StreamError> {
        let mut batch = Batch::default();
        let first = match self.ready.take() {
            Some(received) => Ok(received),
            None => tokio::time::timeout(wait, self.rx.recv()).await,
        };
        let first = match first {
            Err(_) => return Ok(batch),
            Ok(None) => {
                return Err(StreamError::Mongo(mongodb::error::Error::custom("the change stream reader stopped")));
            }
            Ok(Some(m)) => m?,
        };
        let taken = Instant::now();
        let take = |m: Read, batch: &mut Batch| match m {
            Read::Event(row, token, arrival) => {
                batch.events.push(StreamEvent {
                    row: *row,
                    token,
                    arrival: Arrival { taken: taken.max(arrival.read), ..arrival },
                });
                batch.idle_token = None;
            }
            Read::Idle(token) => batch.idle_token = Some(token),
        };
        take(first, &mut batch);
        let deadline = tokio::time::Instant::now() + linger;
        while batch.events.len() < max {
            match self.rx.try_recv() {
                Ok(m) => take(m?, &mut batch),
                Err(mpsc::error::TryRecvError::Empty) if !linger.is_zero() && !batch.events.is_empty() => {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(m)) => take(m?, &mut batch),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::{Bson, RawDocumentBuf, doc};

    use super::row_of;

    fn raw(d: mongodb::bson::Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn an_insert_event_without_its_document_is_unreadable_under_its_document_keys_id() {
        let event = raw(doc! {"_id": {"_data": "82"}, "operationType": "insert", "documentKey": {"_id": "e-1"}});
        let unreadable = row_of(&event).unwrap_err();
        assert_eq!(*unreadable.id, Bson::String("e-1".into()));
        assert_eq!(unreadable.reason, "the insert event carries no document");
    }

    #[test]
    fn an_inserted_document_that_is_not_a_row_is_unreadable_naming_why() {
        let event = raw(doc! {
            "_id": {"_data": "82"},
            "operationType": "insert",
            "documentKey": {"_id": "e-2"},
            "fullDocument": {"_id": "e-2", "aggregateId": "a-1"},
        });
        let unreadable = row_of(&event).unwrap_err();
        assert_eq!(*unreadable.id, Bson::String("e-2".into()));
        assert_eq!(unreadable.aggregate_id.as_deref(), Some("a-1"));
        assert!(unreadable.reason.starts_with("not an outbox row"), "{}", unreadable.reason);
    }
}
