//! The webhook's batch mode: many events to a request.

use std::{collections::HashSet, sync::Mutex, time::Instant};

use futures::StreamExt;

use super::{Decoded, Failure, Handled, Outcome, Pipeline, Record, Step, ToSend, aggregate_of};
use crate::consumer::{decode::DecodedEvent, handlers::HandlerError, ordering::Run, webhook};

impl Pipeline {
    /// Batch mode: the runs that need nothing but a delivery go many to a
    /// request (whole runs, in order, up to the batch size; a longer run
    /// sends its first ones and the rest come next round), up to
    /// `--max-in-flight` requests at once. A request's answer is each of its
    /// events': on a failure, the first event of each of its runs is tried
    /// again (or dead-lettered once its attempts are spent) as if sent
    /// alone, and the rest of its run waits behind it. Runs that need more
    /// (a record to retry from the dead-letter path, one that does not
    /// decode, a parked aggregate, one beyond the dedup horizon) go lane by
    /// lane, in batches of one.
    pub(super) async fn deliver_batches(
        &self,
        webhook: &webhook::Webhook,
        runs: Vec<(Run<Record>, Vec<Decoded>)>,
        parked: &HashSet<String>,
        claimed: &Mutex<HashSet<String>>,
    ) -> Vec<Handled> {
        let max = webhook.batch_max().unwrap_or(1);
        let plain = |(run, decoded): &(Run<Record>, Vec<Decoded>)| {
            run.prior.dead_letter.is_none()
                && decoded.iter().all(|d| matches!(d, Some(Ok(_))))
                && run.entries.iter().all(|e| {
                    aggregate_of(&e.item).is_none_or(|a| !parked.contains(a)) && self.beyond_horizon(&e.item).is_none()
                })
        };
        let (plain, alone): (Vec<_>, Vec<_>) = runs.into_iter().partition(plain);
        let mut done = self.run_lanes(alone, parked, claimed).await;
        // Per run: its steps (Skipped until decided) and the events to send, by index in the run.
        let mut pending: Vec<(Run<Record>, Vec<Step>, ToSend)> = Vec::with_capacity(plain.len());
        for (run, decoded) in plain {
            let mut steps = vec![Step::Skipped; run.entries.len()];
            let mut events = Vec::new();
            for (i, d) in decoded.into_iter().enumerate() {
                let Some(Ok(e)) = d else { continue };
                if !claimed.lock().expect("claimed ids").insert(e.event_id.clone()) {
                    steps[i] = Step::Done(Outcome::Duplicate);
                } else if events.len() < max {
                    events.push((i, e));
                }
            }
            pending.push((run, steps, events));
        }
        // Whole runs to a request, up to `max` events.
        let mut requests: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for (r, (_, _, events)) in pending.iter().enumerate() {
            if events.is_empty() {
                continue;
            }
            if requests.is_empty() || size + events.len() > max {
                requests.push(Vec::new());
                size = 0;
            }
            requests.last_mut().expect("a request").push(r);
            size += events.len();
        }
        let answers: Vec<(Vec<usize>, std::result::Result<(), HandlerError>)> = futures::stream::iter(requests)
            .map(|request| {
                let events: Vec<&DecodedEvent> =
                    request.iter().flat_map(|r| pending[*r].2.iter().map(|(_, e)| e)).collect();
                async move {
                    let start = Instant::now();
                    self.metrics.in_flight.inc();
                    let answer = webhook.deliver_batch(&events).await;
                    self.metrics.in_flight.dec();
                    self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
                    (request, answer)
                }
            })
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await;
        let mut marks: Vec<Vec<mongodb::bson::Document>> = vec![Vec::new(); pending.len()];
        for (request, answer) in answers {
            for r in request {
                let (run, steps, events) = &mut pending[r];
                match &answer {
                    Ok(()) => {
                        for (i, e) in events.iter() {
                            steps[*i] = Step::Done(Outcome::Applied);
                            marks[r].push(self.store.mark_document(&e.event_id, &e.event_name));
                        }
                    }
                    Err(e) => {
                        let (first, _) = events[0];
                        let attempts = if first == 0 { run.prior.attempts } else { 0 } + 1;
                        let failure = Failure::from(e.clone());
                        steps[first] = self.after_failure(&run.entries[first].item, attempts, failure).await;
                    }
                }
            }
        }
        done.extend(pending.into_iter().zip(marks).map(|((run, steps, _), marks)| (run, steps, marks)));
        done
    }
}
