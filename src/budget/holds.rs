//! Routes held after an endpoint or organisation limit: a Genesys 429 that came while the
//! token still had budget is not the token's, so the *route* (method and path with ids
//! collapsed) waits until `Retry-After`, and every other route keeps flowing on every token.
//!
//! The request path pays one atomic load while nothing is held; the map is looked at only
//! while some route is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Routes held at once, at most: past it the hold ending soonest gives way.
pub const MAX_HELD_ROUTES: usize = 256;

/// Why a 429 came: the token's own budget, or a limit of the endpoint or organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Token,
    Endpoint,
}

/// Which limit a 429 met. With the token's own headers on the answer, a count below the
/// allowed calls means the token had budget: an endpoint or org limit. Without them,
/// `left_before` (what the budget knew the token had left, from the answers before) decides;
/// unknown counts as the token's (the cautious reading: it rests the token).
pub fn classify(count: Option<u64>, allowed: Option<u64>, left_before: Option<u64>) -> Scope {
    match (count, allowed) {
        (Some(count), Some(allowed)) if count < allowed => Scope::Endpoint,
        (Some(_), Some(_)) => Scope::Token,
        _ if left_before.is_some_and(|left| left >= 2) => Scope::Endpoint,
        _ => Scope::Token,
    }
}

/// A path segment that names one resource rather than a kind: a number, a UUID, or a long
/// token with digits (job ids, conversation ids, base64 keys).
fn is_id(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    if segment.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let uuid = segment.len() == 36
        && segment.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    uuid || (segment.len() >= 16 && segment.bytes().any(|b| b.is_ascii_digit()))
}

/// `GET /api/v2/analytics/conversations/details/jobs/{id}`: the method and the path with
/// each id segment collapsed, so all calls of one endpoint share a hold.
pub fn route_key(method: &str, path: &str) -> String {
    let mut key = String::with_capacity(method.len() + 1 + path.len());
    key.push_str(method);
    key.push(' ');
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            key.push('/');
        }
        key.push_str(if is_id(segment) { "{id}" } else { segment });
    }
    key
}

struct Hold {
    until: Instant,
    since: Instant,
    /// 429s that set or extended it.
    hits: u64,
}

/// One held route, as `/status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldRoute {
    pub route: String,
    pub held_for: Duration,
    pub left: Duration,
    pub hits: u64,
}

/// The routes held now.
#[derive(Default)]
pub struct RouteHolds {
    /// Entries in `map` (some may have ended): zero means nothing is held.
    count: AtomicUsize,
    map: Mutex<HashMap<String, Hold>>,
}

/// Drops the holds that ended by `now` and stores how many are left.
fn prune(map: &mut HashMap<String, Hold>, count: &AtomicUsize, now: Instant) {
    map.retain(|_, h| h.until > now);
    count.store(map.len(), Ordering::Release);
}

impl RouteHolds {
    /// Holds `route` until `until` (a later hold of the same route extends it).
    pub fn hold(&self, route: String, until: Instant, now: Instant) {
        let mut map = lock(&self.map);
        prune(&mut map, &self.count, now);
        if !map.contains_key(&route) && map.len() >= MAX_HELD_ROUTES {
            if let Some(soonest) = map
                .iter()
                .min_by_key(|(_, h)| h.until)
                .map(|(k, _)| k.clone())
            {
                map.remove(&soonest);
            }
        }
        let hold = map.entry(route).or_insert(Hold {
            until,
            since: now,
            hits: 0,
        });
        hold.until = hold.until.max(until);
        hold.hits += 1;
        self.count.store(map.len(), Ordering::Release);
    }

    /// When the route of `method` and `path` is free again, if it is held now.
    pub fn held_until(&self, method: &str, path: &str, now: Instant) -> Option<Instant> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let key = route_key(method, path);
        let mut map = lock(&self.map);
        let until = map.get(&key).map(|h| h.until).filter(|until| *until > now);
        if until.is_none() {
            // Its hold ended (or another one did): forget what is over.
            prune(&mut map, &self.count, now);
        }
        until
    }

    /// The routes held now, the longest-held first.
    pub fn snapshot(&self, now: Instant) -> Vec<HeldRoute> {
        if self.count.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let map = lock(&self.map);
        let mut held: Vec<HeldRoute> = map
            .iter()
            .filter(|(_, h)| h.until > now)
            .map(|(route, h)| HeldRoute {
                route: route.clone(),
                held_for: now.saturating_duration_since(h.since),
                left: h.until.saturating_duration_since(now),
                hits: h.hits,
            })
            .collect();
        held.sort_by(|a, b| b.held_for.cmp(&a.held_for).then(a.route.cmp(&b.route)));
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_collapse_and_kinds_stay() {
        assert_eq!(
            route_key(
                "GET",
                "/api/v2/analytics/conversations/details/jobs/0f8fad5b-d9cb-469f-a165-70867728950e/results"
            ),
            "GET /api/v2/analytics/conversations/details/jobs/{id}/results"
        );
        assert_eq!(route_key("GET", "/api/v2/flows"), "GET /api/v2/flows");
        assert_eq!(
            route_key("DELETE", "/api/v2/users/12345/roles"),
            "DELETE /api/v2/users/{id}/roles"
        );
        assert_eq!(
            route_key("GET", "/api/v2/conversations/AbC123dEf456GhI789"),
            "GET /api/v2/conversations/{id}"
        );
        // Words, even long ones, are not ids.
        assert_eq!(
            route_key("GET", "/api/v2/organizations/limits/namespaces"),
            "GET /api/v2/organizations/limits/namespaces"
        );
    }

    #[test]
    fn a_429_with_budget_left_is_the_endpoints() {
        assert_eq!(classify(Some(12), Some(300), None), Scope::Endpoint);
        assert_eq!(classify(Some(300), Some(300), Some(200)), Scope::Token);
        assert_eq!(classify(None, None, Some(150)), Scope::Endpoint);
        assert_eq!(classify(None, None, Some(1)), Scope::Token);
        assert_eq!(classify(None, None, None), Scope::Token);
    }

    #[test]
    fn holds_end_extend_and_stay_bounded() {
        let holds = RouteHolds::default();
        let now = Instant::now();
        assert_eq!(holds.held_until("GET", "/api/v2/flows", now), None);
        holds.hold(
            route_key("GET", "/api/v2/flows"),
            now + Duration::from_secs(5),
            now,
        );
        assert_eq!(
            holds.held_until("GET", "/api/v2/flows", now),
            Some(now + Duration::from_secs(5))
        );
        assert_eq!(holds.held_until("POST", "/api/v2/flows", now), None);
        holds.hold(
            route_key("GET", "/api/v2/flows"),
            now + Duration::from_secs(9),
            now,
        );
        let snap = holds.snapshot(now);
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].hits, 2);
        assert_eq!(snap[0].left, Duration::from_secs(9));
        let later = now + Duration::from_secs(10);
        assert_eq!(holds.held_until("GET", "/api/v2/flows", later), None);
        assert_eq!(holds.count.load(Ordering::Relaxed), 0);
        for i in 0..MAX_HELD_ROUTES + 10 {
            holds.hold(
                format!("GET /api/v2/r{i}"),
                now + Duration::from_secs(100 + i as u64),
                now,
            );
        }
        assert_eq!(holds.snapshot(now).len(), MAX_HELD_ROUTES);
        // The soonest-ending gave way.
        assert_eq!(holds.held_until("GET", "/api/v2/r0", now), None);
        assert!(holds
            .held_until("GET", &format!("/api/v2/r{}", MAX_HELD_ROUTES + 9), now)
            .is_some());
    }
}
