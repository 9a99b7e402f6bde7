//! MongoDB is real: a single-node replica set with multi-document
//! transactions and change streams.

mod common;

use futures::StreamExt;
use mongodb::bson::{Document, doc};
use std::time::Duration;

#[tokio::test]
async fn transaction_commits_both_writes_and_abort_leaves_none() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("smoke")));
    let sessions = db.collection::<Document>("sessions");
    let outbox = db.collection::<Document>("outbox");
    // Created up front: concurrent transactions creating one collection conflict.
    db.create_collection("sessions").await.unwrap();
    db.create_collection("outbox").await.unwrap();

    let mut s = client.start_session().await.unwrap();
    s.start_transaction().await.unwrap();
    sessions.insert_one(doc! {"_id": "s1"}).session(&mut s).await.unwrap();
    outbox.insert_one(doc! {"_id": "e1", "aggregateId": "s1"}).session(&mut s).await.unwrap();
    s.commit_transaction().await.unwrap();
    assert_eq!(sessions.count_documents(doc! {}).await.unwrap(), 1);
    assert_eq!(outbox.count_documents(doc! {}).await.unwrap(), 1);

    s.start_transaction().await.unwrap();
    sessions.insert_one(doc! {"_id": "s2"}).session(&mut s).await.unwrap();
    outbox.insert_one(doc! {"_id": "e2", "aggregateId": "s2"}).session(&mut s).await.unwrap();
    // Not visible outside the transaction before commit.
    assert_eq!(outbox.count_documents(doc! {"_id": "e2"}).await.unwrap(), 0);
    s.abort_transaction().await.unwrap();
    assert_eq!(sessions.count_documents(doc! {}).await.unwrap(), 1, "aborted session write must vanish");
    assert_eq!(outbox.count_documents(doc! {}).await.unwrap(), 1, "aborted outbox write must vanish");
}

#[tokio::test]
async fn change_stream_delivers_an_insert_and_resumes_after_its_token() {
    let client = common::mongo().await;
    let db = common::TestDb::new(client.database(&common::unique("smoke")));
    let outbox = db.collection::<Document>("outbox");
    db.create_collection("outbox").await.unwrap();

    let mut stream = outbox.watch().await.unwrap();
    outbox.insert_one(doc! {"_id": "e1"}).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("change stream event within 10 s")
        .expect("stream open")
        .unwrap();
    assert_eq!(first.document_key.unwrap().get_str("_id").unwrap(), "e1");
    let token = stream.resume_token().expect("resume token after an event");
    drop(stream);

    outbox.insert_one(doc! {"_id": "e2"}).await.unwrap();
    let mut resumed = outbox.watch().resume_after(token).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .expect("resumed change stream event within 10 s")
        .expect("stream open")
        .unwrap();
    assert_eq!(next.document_key.unwrap().get_str("_id").unwrap(), "e2", "resume continues after e1");
}
