//! One try at one record: the dedup horizon, a parked aggregate, the
//! handler, and what a failure leads to (a wait, another try, or the
//! dead-letter topic).

use std::time::Duration;

use rdkafka::Message;
use tracing::Instrument;

use super::{
    Decoded, Outcome, Pipeline, Record, Step, aggregate_of,
    horizon::{beyond_horizon, now_millis},
};
use crate::{
    consumer::{
        BeyondHorizon,
        dead_letter::PARKED,
        failure::{Failure, NextTry},
        ordering::{self, Prior, reason},
    },
    kafka::headers,
    telemetry::traces,
};

impl Pipeline {
    /// The age of a record older than the dedup window, if it is.
    pub(super) fn beyond_horizon(&self, m: &Record) -> Option<Duration> {
        beyond_horizon(m.timestamp().to_millis(), now_millis(), self.retention)
    }

    /// One try at a record, after the `prior` ones. Ends it (applied,
    /// duplicate, dead-lettered) or says when to try again and why:
    /// - a transient failure (registry, MongoDB or webhook unreachable, a
    ///   timeout, 5xx, 408, 429) is tried again without limit, the backoff
    ///   capped at its maximum, and never dead-lettered: the record waits
    ///   for the outage to end;
    /// - a rejection (a webhook's other 4xx, a write MongoDB refuses) is
    ///   tried up to `--max-attempts`, then dead-lettered;
    /// - a record that cannot be read is dead-lettered at once;
    /// - a record due for the dead-letter topic that the topic did not take
    ///   is tried there again (it is never skipped);
    /// - a record whose aggregate is parked (`parked`, as read for its
    ///   batch, confirmed atomically here) goes to the dead-letter topic
    ///   behind the aggregate's earlier events, unapplied.
    pub(super) async fn try_once(&self, m: &Record, prior: Prior, parked: bool, decoded: Decoded) -> Step {
        let Some(span) = self.handle_span(m) else { return self.try_once_untraced(m, prior, parked, decoded).await };
        let step = self.try_once_untraced(m, prior, parked, decoded).instrument(span.clone()).await;
        match &step {
            Step::Done(outcome) => {
                span.record("outbox.outcome", outcome.label());
            }
            Step::Retry(r) => traces::record_error(&span, &r.error),
            Step::Skipped => {}
        }
        step
    }

    /// The span handling `m`, a child of the span that published it (its
    /// `traceparent` header), while exporting traces.
    pub(super) fn handle_span(&self, m: &Record) -> Option<tracing::Span> {
        if !traces::exporting() {
            return None;
        }
        let span = tracing::info_span!("handle", otel.name = %format!("process {}", m.topic()), otel.kind = "consumer",
            messaging.system = "kafka", messaging.operation.type = "process", messaging.destination.name = m.topic(),
            messaging.destination.partition.id = m.partition(), messaging.kafka.offset = m.offset(),
            messaging.message.id = headers::text(m, headers::EVENT_ID), messaging.consumer.group.name = %self.group,
            outbox.outcome = tracing::field::Empty, trace_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty);
        traces::continue_from(&span, headers::text(m, headers::TRACEPARENT));
        Some(span)
    }

    async fn try_once_untraced(&self, m: &Record, prior: Prior, parked: bool, decoded: Decoded) -> Step {
        if let Some(error) = prior.dead_letter {
            return self.dead_letter(m, error, prior.attempts).await;
        }
        if let Some(age) = self.beyond_horizon(m) {
            match self.beyond_horizon {
                BeyondHorizon::Apply => self.metrics.beyond_horizon.inc(),
                BeyondHorizon::Wait => {
                    let error = format!(
                        "the record is {}s old, older than the processed-events retention ({}s): it may have been \
                         applied and forgotten; raise --processed-retention-seconds, move the group's offsets past \
                         it, or set --beyond-dedup-horizon apply",
                        age.as_secs(),
                        self.retention.as_secs()
                    );
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error,
                        "the record waits");
                    return Step::Retry(ordering::Retry {
                        offset: m.offset(),
                        attempts: prior.attempts,
                        reason: reason::BEYOND_DEDUP_HORIZON,
                        error,
                        backoff: self.backoff.max,
                        dead_letter: None,
                    });
                }
            }
        }
        if parked && let (Some(aggregate), Some(event_id)) = (aggregate_of(m), headers::text(m, headers::EVENT_ID)) {
            match self.parked.park_if_parked(aggregate, event_id).await {
                Ok(true) => {
                    let why = format!("{PARKED}behind an earlier dead-lettered event of aggregate {aggregate}");
                    return self.dead_letter(m, why, prior.attempts).await;
                }
                Ok(false) => {} // released since the batch was read
                Err(e) => return self.mongodb_wait(m, prior, format!("parking the record: {e}"), None),
            }
        }
        let attempts = prior.attempts + 1;
        match self.attempt(m, decoded).await {
            Ok(applied) => Step::Done(applied.into()),
            Err(failure) => self.after_failure(m, attempts, failure).await,
        }
    }

    /// The `attempts`th try at a record failed: when to try again, or to
    /// the dead-letter topic.
    pub(super) async fn after_failure(&self, m: &Record, attempts: u32, failure: Failure) -> Step {
        self.metrics.failures.inc();
        match failure.next_try(&self.backoff, attempts) {
            NextTry::After { backoff, reason } => {
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), attempts,
                    error = %failure.message(), reason, backoff_ms = backoff.as_millis() as u64,
                    "handling failed; its lane waits to try again");
                Step::Retry(ordering::Retry {
                    offset: m.offset(),
                    attempts,
                    reason,
                    error: failure.into_message(),
                    backoff,
                    dead_letter: None,
                })
            }
            NextTry::DeadLetter => self.dead_letter(m, failure.into_message(), attempts).await,
        }
    }

    /// A MongoDB failure on the way: the record waits (transient).
    pub(super) fn mongodb_wait(&self, m: &Record, prior: Prior, error: String, dead_letter: Option<String>) -> Step {
        self.metrics.failures.inc();
        let attempts = prior.attempts + 1;
        // Without an attempt limit and without jitter: the base delay, capped.
        let backoff = self.backoff.base_delay(attempts);
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error, "the record waits");
        Step::Retry(ordering::Retry {
            offset: m.offset(),
            attempts,
            reason: reason::MONGODB,
            error,
            backoff,
            dead_letter,
        })
    }

    /// Park the record's aggregate and send the record to its dead-letter
    /// topic. When the topic does not take it, the record is not skipped:
    /// its lane waits (`dead_letter`) and it is sent again after the
    /// maximum backoff.
    pub(super) async fn dead_letter(&self, m: &Record, error: String, attempts: u32) -> Step {
        // Park the aggregate first (idempotent): its later events must not overtake this one.
        if let (Some(aggregate), Some(event_id)) = (aggregate_of(m), headers::text(m, headers::EVENT_ID))
            && let Err(e) = self.parked.park(aggregate, event_id, &error).await
        {
            let prior = Prior { attempts, dead_letter: None };
            return self.mongodb_wait(m, prior, format!("parking its aggregate: {e}"), Some(error));
        }
        match self.dead_letters.send(m, &error, attempts).await {
            Ok(topic) if error.starts_with(PARKED) => {
                self.metrics.parked.inc();
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                    error, "record parked");
                Step::Done(Outcome::Parked)
            }
            Ok(topic) => {
                self.metrics.dead_lettered.inc();
                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), dead_letter_topic = %topic,
                    attempts, error, "record dead-lettered");
                Step::Done(Outcome::DeadLettered)
            }
            Err(not_taken) => {
                let backoff = self.backoff.max;
                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    dead_letter_topic = %not_taken.topic, error = %not_taken.source, backoff_ms = backoff.as_millis() as u64,
                    "the dead-letter topic did not take the record; its lane waits");
                Step::Retry(ordering::Retry {
                    offset: m.offset(),
                    attempts,
                    reason: reason::DEAD_LETTER,
                    error: not_taken.to_string(),
                    backoff,
                    dead_letter: Some(error),
                })
            }
        }
    }
}
