//! The routes the relay has worked out, kept: an event's topic and the
//! schema it is encoded with (with its registry id) are the same for every
//! event of one aggregate type, event name and version, for as long as the
//! schema choice stands (`EventSchemas::stands`: until the schema
//! directory is read again with a change, or the registry's newest version
//! is asked again). Looked up per event with the row's own strings: a kept
//! route costs no allocation, no topic name built and no schema text
//! compared.
//!
//! Only routes that were worked out are kept, so there are at most as many
//! as the kinds of event that have a schema.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::relay::schemas::{Chosen, Standing};

/// Where events of one kind go, and with which schema.
#[derive(Clone)]
pub struct Route {
    pub topic: Arc<str>,
    pub chosen: Chosen,
}

/// Routes, with how long each stands, by aggregate type, then event name,
/// then version.
type ByKind = HashMap<String, HashMap<String, HashMap<u32, (Route, Standing)>>>;

#[derive(Default)]
pub struct Routes {
    known: Mutex<ByKind>,
}

impl Routes {
    /// The route kept for this kind of event, if `stands` says it still
    /// holds.
    pub fn get(
        &self,
        aggregate_type: &str,
        event_name: &str,
        version: u32,
        stands: impl Fn(&Standing) -> bool,
    ) -> Option<Route> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let (route, standing) = known.get(aggregate_type)?.get(event_name)?.get(&version)?;
        stands(standing).then(|| route.clone())
    }

    /// Keep `route` for this kind of event while `standing` holds (in place
    /// of one that no longer stands).
    pub fn keep(&self, aggregate_type: &str, event_name: &str, version: u32, route: Route, standing: Standing) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known
            .entry(aggregate_type.to_owned())
            .or_default()
            .entry(event_name.to_owned())
            .or_default()
            .insert(version, (route, standing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(topic: &str) -> Route {
        let schema = apache_avro::Schema::parse_str(r#"{"type": "record", "name": "E", "fields": []}"#).unwrap();
        let registered = crate::registry_client::ids::Registered { id: 7, schema };
        Route { topic: topic.into(), chosen: Chosen::Registered(Arc::new(registered)) }
    }

    #[test]
    fn a_route_is_kept_per_kind_of_event_while_it_stands() {
        let routes = Routes::default();
        assert!(routes.get("Order", "OrderPlaced", 1, |_| true).is_none());
        routes.keep("Order", "OrderPlaced", 1, route("orders"), Standing::ForGood);
        let kept = routes.get("Order", "OrderPlaced", 1, |_| true).expect("kept");
        assert_eq!((&*kept.topic, kept.chosen.id()), ("orders", 7));
        assert!(routes.get("Order", "OrderPlaced", 2, |_| true).is_none(), "another version");
        assert!(routes.get("Order", "OrderShipped", 1, |_| true).is_none(), "another event");
        assert!(routes.get("Invoice", "OrderPlaced", 1, |_| true).is_none(), "another aggregate type");
        assert!(routes.get("Order", "OrderPlaced", 1, |_| false).is_none(), "no longer standing");
        routes.keep("Order", "OrderPlaced", 1, route("orders.v2"), Standing::ForGood);
        assert_eq!(&*routes.get("Order", "OrderPlaced", 1, |_| true).unwrap().topic, "orders.v2", "replaced");
    }
}
