//! The projection's round in one MongoDB transaction.

use std::collections::HashSet;

use super::{Outcome, Pipeline, Record, Step};
use crate::{
    consumer::ordering::{Prior, Run},
    telemetry::traces,
};

impl Pipeline {
    /// The projection's round in one transaction: `Err` gives the runs back
    /// when it cannot be (a record does not decode, is a retry, is parked or
    /// beyond the dedup horizon) or the transaction fails.
    pub(super) async fn apply_together(
        &self,
        runs: Vec<Run<Record>>,
        parked: &HashSet<String>,
    ) -> std::result::Result<Vec<(Run<Record>, Vec<Step>)>, Vec<Run<Record>>> {
        let records: Vec<&Record> = runs.iter().flat_map(|r| r.entries.iter().map(|e| &e.item)).collect();
        // Records older than the dedup window take the lane path, which decides on them.
        if records.len() < 2
            || !parked.is_empty()
            || runs.iter().any(|r| r.prior != Prior::default())
            || records.iter().any(|m| self.beyond_horizon(m).is_some())
        {
            return Err(runs);
        }
        let mut events = Vec::with_capacity(records.len());
        for m in &records {
            match self.decode(m).await {
                Ok(e) => events.push(e),
                Err(_) => return Err(runs),
            }
        }
        // One handle span per record (while exporting), each lasting the batch's apply.
        let spans: Vec<_> = records.iter().filter_map(|m| self.handle_span(m)).collect();
        let start = std::time::Instant::now();
        match self.handler.apply_batch(&events, &self.store).await {
            Ok(applied) => {
                self.metrics.handler_seconds.observe(start.elapsed().as_secs_f64());
                for (span, a) in spans.iter().zip(&applied) {
                    span.record("outbox.outcome", Outcome::from(*a).label());
                }
                let mut applied = applied.into_iter();
                let done: Vec<(Run<Record>, Vec<Step>)> = runs
                    .into_iter()
                    .map(|run| {
                        let steps: Vec<Step> =
                            run.entries.iter().filter_map(|_| applied.next()).map(|a| Step::Done(a.into())).collect();
                        (run, steps)
                    })
                    .collect();
                for (_, steps) in &done {
                    self.count(steps);
                }
                Ok(done)
            }
            Err(e) => {
                for span in &spans {
                    traces::record_error(span, "the batch failed; handled record by record");
                }
                tracing::warn!(error = %e, records = records.len(), "the batch failed; handling its records lane by lane");
                Err(runs)
            }
        }
    }
}
