//! `outbox schemas register|check` against the real registry.

mod common;

use std::process::Command;

fn outbox(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("SCHEMA_REGISTRY_URL", common::schema_registry_url())
        .env("SCHEMAS_DIR", common::SAMPLE_SCHEMAS)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outbox");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn register_then_check_and_an_incompatible_subject_fails_the_check() {
    let topic = common::unique("schemas-cli");
    let route = format!("Session={topic}");
    let (ok, out) = outbox(&["schemas", "check", "--route", &route]);
    assert!(ok && out.matches("new ").count() == 4, "nothing registered yet: {out}");
    let (ok, out) = outbox(&["schemas", "register", "--route", &route]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("registered ").count(), 4, "{out}");
    assert!(out.contains(&format!("under {topic}-dev.outbox.session.SessionCreated")), "{out}");
    let (ok, out) = outbox(&["schemas", "check", "--route", &route]);
    assert!(ok && out.matches("compatible ").count() == 4, "{out}");

    // Someone registers an incompatible SessionEnded under the subject (compatibility NONE).
    let http = common::http();
    let url = common::schema_registry_url();
    let subject = format!("{topic}-dev.outbox.session.SessionEnded");
    http.put(format!("{url}/config/{subject}"))
        .json(&serde_json::json!({"compatibility": "NONE"}))
        .send()
        .await
        .unwrap();
    let other = r#"{"type":"record","name":"SessionEnded","namespace":"dev.outbox.session","fields":[{"name":"x","type":"int"}]}"#;
    let r = http
        .post(format!("{url}/subjects/{subject}/versions"))
        .json(&serde_json::json!({"schema": other}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    http.put(format!("{url}/config/{subject}"))
        .json(&serde_json::json!({"compatibility": "BACKWARD"}))
        .send()
        .await
        .unwrap();
    let (ok, out) = outbox(&["schemas", "check", "--route", &route]);
    assert!(!ok, "the check fails: {out}");
    assert!(out.contains("INCOMPATIBLE ") && out.contains("schemas/session/Session.SessionEnded.v1.avsc"), "{out}");
}
