//! Handles to labelled counters for the request path. `with_label_values` hashes the label
//! values and takes the family's lock on every call; a request increments two to four labelled
//! counters, so the handles are looked up once (on first use, so a value never seen is not
//! rendered) and kept.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec};

/// A closed set of label values: each value has an index into [`LabelSet::LABELS`].
pub trait LabelSet: Copy {
    const LABELS: &'static [&'static str];
    fn index(self) -> usize;
}

/// Defines an enum whose variants are the values of one label.
macro_rules! label_set {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl LabelSet for $name {
            const LABELS: &'static [&'static str] = &[$($label),+];
            fn index(self) -> usize {
                self as usize
            }
        }

        impl $name {
            /// The label value.
            pub fn label(self) -> &'static str {
                <Self as LabelSet>::LABELS[self as usize]
            }
        }
    };
}

label_set! {
    /// `replays_total{outcome}`: what became of a request after an upstream 401.
    ReplayOutcome {
        Success => "success",
        RejectedAgain => "rejected_again",
        BodyTooLarge => "body_too_large",
        NoNewToken => "no_new_token",
    }
}

label_set! {
    /// `rate_limited_total{outcome}`: how a request met the rate limit.
    RateLimitOutcome {
        Absorbed => "absorbed",
        PassedThrough => "passed_through",
        QueueTimeout => "queue_timeout",
        QueueFull => "queue_full",
    }
}

label_set! {
    /// `jwks_fetches_total{outcome}`.
    JwksFetch {
        Success => "success",
        Failed => "failed",
    }
}

label_set! {
    /// `trace_spans_total{outcome}`: what became of a finished span.
    SpanOutcome {
        Exported => "exported",
        Dropped => "dropped",
        Failed => "failed",
    }
}

label_set! {
    /// `cluster_tokens_total{how}`: how a replica came by a token.
    ClusterTake {
        Adopted => "adopted",
        MintedShared => "minted_shared",
        MintedStandalone => "minted_standalone",
    }
}

label_set! {
    /// `app_requests_total{outcome}`: what became of an app's request at the proxy's door.
    AppOutcome {
        Allowed => "allowed",
        NotAllowed => "not_allowed",
        Unauthenticated => "unauthenticated",
        RateLimited => "rate_limited",
    }
}

label_set! {
    /// `app_auth_failures_total{proof}`: which proof failed.
    AuthFailure {
        Login => "login",
        ApiKey => "api_key",
        AppToken => "app_token",
        Missing => "missing",
        Malformed => "malformed",
        Throttled => "throttled",
        Certificate => "certificate",
        WorkloadToken => "workload_token",
    }
}

label_set! {
    /// `budget_requests_total{outcome}`: how a request was admitted to the budget.
    Admission {
        Served => "served",
        Queued => "queued",
        Refused => "refused",
    }
}

/// Every value of `requests_total`'s `code` label: the common status codes, which get a label
/// of their own, then `0` (no answer written) and the classes the others are counted by.
const CODE_LABELS: [&str; 27] = [
    "200", "201", "202", "204", "301", "302", "304", "400", "401", "403", "404", "405", "409",
    "413", "415", "429", "500", "501", "502", "503", "504", "0", "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// The common codes, read from the first [`CODE_LABELS`] at compile time.
const COMMON_CODES: [u16; 21] = {
    let mut codes = [0u16; 21];
    let mut i = 0;
    while i < codes.len() {
        let d = CODE_LABELS[i].as_bytes();
        codes[i] = (d[0] - b'0') as u16 * 100 + (d[1] - b'0') as u16 * 10 + (d[2] - b'0') as u16;
        i += 1;
    }
    codes
};

/// An HTTP status as the `code` label counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub u16);

impl LabelSet for Code {
    const LABELS: &'static [&'static str] = &CODE_LABELS;
    fn index(self) -> usize {
        if let Some(i) = COMMON_CODES.iter().position(|c| *c == self.0) {
            return i;
        }
        COMMON_CODES.len()
            + match self.0 {
                0 => 0,
                100..=199 => 1,
                200..=299 => 2,
                300..=399 => 3,
                400..=499 => 4,
                _ => 5,
            }
    }
}

/// The `requests_total` label of a status code: a bounded set, never the raw number.
pub fn status_label(status: u16) -> &'static str {
    CODE_LABELS[Code(status).index()]
}

/// One counter family's counters for every value of `E`, after any fixed leading label
/// values (e.g. the `app` of `budget_requests_total`).
pub struct Handles<E: LabelSet> {
    family: IntCounterVec,
    leading: Vec<String>,
    cells: Box<[OnceLock<IntCounter>]>,
    set: PhantomData<E>,
}

impl<E: LabelSet> Handles<E> {
    pub fn new(family: IntCounterVec, leading: &[&str]) -> Self {
        Handles {
            family,
            leading: leading.iter().map(|s| s.to_string()).collect(),
            cells: E::LABELS.iter().map(|_| OnceLock::new()).collect(),
            set: PhantomData,
        }
    }

    /// The counter for `value`.
    pub fn get(&self, value: E) -> &IntCounter {
        let i = value.index();
        self.cells[i].get_or_init(|| {
            let mut labels: Vec<&str> = self.leading.iter().map(String::as_str).collect();
            labels.push(E::LABELS[i]);
            self.family.with_label_values(&labels)
        })
    }

    pub fn inc(&self, value: E) {
        self.get(value).inc();
    }

    /// The whole family (e.g. for a sum over its labels).
    pub fn family(&self) -> &IntCounterVec {
        &self.family
    }
}

/// `{app, outcome}` counters (`budget_requests_total`, `app_requests_total`): handles per app
/// name. Names come from the configuration, so the list is short and grows only when a
/// reload adds a name; [`AppCounters::forget`] drops the series of names no longer configured.
pub struct AppCounters<E: LabelSet = Admission> {
    family: IntCounterVec,
    /// The name of unattributed requests (`other`, `unknown`), always present.
    fallback: (&'static str, Arc<Handles<E>>),
    apps: ArcSwap<Vec<AppHandles<E>>>,
}

/// One app's name and its counters.
type AppHandles<E> = (Box<str>, Arc<Handles<E>>);

impl<E: LabelSet> AppCounters<E> {
    pub fn new(family: IntCounterVec, fallback: &'static str) -> Self {
        AppCounters {
            fallback: (
                fallback,
                Arc::new(Handles::new(family.clone(), &[fallback])),
            ),
            family,
            apps: ArcSwap::from_pointee(Vec::new()),
        }
    }

    pub fn inc(&self, app: &str, outcome: E) {
        self.handles(app).inc(outcome);
    }

    /// The counters of `app`, made on first use; look them up once and keep them.
    pub fn handles(&self, app: &str) -> Arc<Handles<E>> {
        if app == self.fallback.0 {
            return self.fallback.1.clone();
        }
        if let Some((_, h)) = self.apps.load().iter().find(|(name, _)| &**name == app) {
            return h.clone();
        }
        let handles = Arc::new(Handles::new(self.family.clone(), &[app]));
        let mut kept = handles.clone();
        self.apps.rcu(|apps| {
            let mut apps = Vec::clone(apps);
            match apps.iter().find(|(name, _)| &**name == app) {
                Some((_, h)) => kept = h.clone(),
                None => apps.push((app.into(), handles.clone())),
            }
            apps
        });
        kept
    }

    /// Drops the series of every name not in `keep` (apps a reload removed).
    pub fn forget(&self, keep: &[&str]) {
        let gone: Vec<Box<str>> = self
            .apps
            .load()
            .iter()
            .filter(|(name, _)| !keep.contains(&&**name))
            .map(|(name, _)| name.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        self.apps.rcu(|apps| {
            let mut apps = Vec::clone(apps);
            apps.retain(|(name, _)| !gone.contains(name));
            apps
        });
        for name in &gone {
            for label in E::LABELS {
                let _ = self.family.remove_label_values(&[&**name, *label]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    #[test]
    fn status_labels_are_bounded_and_match_their_code() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(504), "504");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(700), "5xx");
        assert_eq!(status_label(0), "0");
        assert_eq!(status_label(103), "1xx");
        for (i, code) in COMMON_CODES.iter().enumerate() {
            assert_eq!(CODE_LABELS[i], code.to_string());
        }
    }

    #[test]
    fn handles_count_in_the_family_and_only_used_values_appear() {
        let family = IntCounterVec::new(Opts::new("t", "t"), &["outcome"]).unwrap();
        let h: Handles<ReplayOutcome> = Handles::new(family.clone(), &[]);
        h.inc(ReplayOutcome::NoNewToken);
        h.inc(ReplayOutcome::NoNewToken);
        assert_eq!(family.with_label_values(&["no_new_token"]).get(), 2);
        let seen: Vec<String> = prometheus::core::Collector::collect(&family)[0]
            .get_metric()
            .iter()
            .map(|m| m.get_label()[0].value().to_string())
            .collect();
        assert_eq!(seen, ["no_new_token"]);
    }

    #[test]
    fn app_counters_keep_apps_apart() {
        let family = IntCounterVec::new(Opts::new("t", "t"), &["app", "outcome"]).unwrap();
        let apps: AppCounters = AppCounters::new(family.clone(), "other");
        apps.inc("reporting", Admission::Served);
        apps.inc("reporting", Admission::Served);
        apps.inc("other", Admission::Refused);
        apps.inc("crm", Admission::Queued);
        assert_eq!(family.with_label_values(&["reporting", "served"]).get(), 2);
        assert_eq!(family.with_label_values(&["other", "refused"]).get(), 1);
        assert_eq!(family.with_label_values(&["crm", "queued"]).get(), 1);
        assert_eq!(apps.apps.load().len(), 2);
    }
}
