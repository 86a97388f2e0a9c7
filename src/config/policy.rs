//! Builders for the policy sections — `[budget]` and `[anomaly]` — and the warnings about
//! listeners that face the network.

use std::time::Duration;

use super::builder::{parse_cidrs, Builder, Built};
use super::file::{AnomalySection, BudgetSection};
use super::model::*;

/// Listeners that face the network where the rest of the config does not expect it.
pub(super) fn exposure_warnings(
    restart: &ProxyListen,
    live: &ProxyLive,
    admin: &AdminSettings,
) -> Vec<String> {
    let mut out = Vec::new();
    let cidrs = &live.allowed_client_cidrs;
    if !restart.listen.ip().is_loopback() && cidrs.iter().all(|n| n.addr().is_loopback()) {
        out.push(format!(
            "proxy.listen = {} accepts connections from the network, but proxy.allowed_client_cidrs only allows loopback: every remote application will get 403 (list their networks)",
            restart.listen
        ));
    }
    if cidrs.iter().any(|n| n.prefix_len() == 0) {
        out.push("proxy.allowed_client_cidrs allows every address (a /0 network): anyone who can reach the proxy calls Genesys with its credentials".into());
    }
    if !admin.listen.ip().is_loopback() {
        let open = if admin.reload_token.is_some() {
            "/status and /metrics are unauthenticated to anyone who can reach it (firewall it)"
        } else {
            "/status, /metrics and POST /reload are unauthenticated to anyone who can reach it (firewall it; set admin.reload_token)"
        };
        out.push(format!(
            "admin.listen = {} is reachable from the network: {open}",
            admin.listen
        ));
    }
    out
}

pub(super) fn budget(b: &Builder, raw: BudgetSection) -> Built<BudgetSettings> {
    let requests_per_window = match raw.requests_per_window.unwrap_or(300) {
        0 => return Err(b.err("budget.requests_per_window", "must be at least 1")),
        n => n,
    };
    let window = match raw.window_seconds.unwrap_or(60) {
        n @ 1..=3600 => Duration::from_secs(n),
        _ => return Err(b.err("budget.window_seconds", "must be between 1 and 3600")),
    };
    let max_queue_length = match raw.max_queue_length.unwrap_or(1000) {
        n @ 1..=1_000_000 => n,
        _ => return Err(b.err("budget.max_queue_length", "must be between 1 and 1000000")),
    };
    let mut apps = Vec::new();
    for (i, app) in raw.app.unwrap_or_default().into_iter().enumerate() {
        let key = format!("budget.app[{i}]");
        let name = app.name.unwrap_or_default();
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(b.err(
                &format!("{key}.name"),
                "is required: letters, digits, '-' or '_' (it becomes a metric label)",
            ));
        }
        if name == "other" || apps.iter().any(|a: &AppGroup| a.name == name) {
            return Err(b.err(
                &format!("{key}.name"),
                format!("{name:?} is reserved or used twice"),
            ));
        }
        let cidrs = parse_cidrs(b, &app.cidrs.unwrap_or_default(), &format!("{key}.cidrs"))?;
        let weight = match app.weight.unwrap_or(1) {
            w @ 1..=1000 => w,
            _ => return Err(b.err(&format!("{key}.weight"), "must be between 1 and 1000")),
        };
        apps.push(AppGroup {
            name,
            cidrs,
            weight,
        });
    }
    if apps.len() > 64 {
        return Err(b.err(
            "budget.app",
            "at most 64 application groups (metric labels stay bounded)",
        ));
    }
    Ok(BudgetSettings {
        requests_per_window,
        window,
        max_queue_wait: b.ms(raw.max_queue_wait_ms, 5_000, "budget.max_queue_wait_ms")?,
        max_queue_length,
        apps,
    })
}

pub(super) fn anomaly(b: &Builder, a: AnomalySection) -> Built<AnomalyThresholds> {
    let d = AnomalyThresholds::default();
    let ms = |v: Option<u64>, default: Duration, key| b.ms(v, default.as_millis() as u64, key);
    Ok(AnomalyThresholds {
        window: ms(a.window_ms, d.window, "anomaly.window_ms")?,
        quiet: ms(a.quiet_ms, d.quiet, "anomaly.quiet_ms")?,
        refresh_failures: b.count(
            a.refresh_failures,
            d.refresh_failures,
            "anomaly.refresh_failures",
        )?,
        invalid_client: b.count(a.invalid_client, d.invalid_client, "anomaly.invalid_client")?,
        early_rejection: b.count(
            a.early_rejection,
            d.early_rejection,
            "anomaly.early_rejection",
        )?,
        unauthorized: b.count(a.unauthorized, d.unauthorized, "anomaly.unauthorized")?,
        rate_limited: b.count(a.rate_limited, d.rate_limited, "anomaly.rate_limited")?,
        early_rejection_age: ms(
            a.early_rejection_age_ms,
            d.early_rejection_age,
            "anomaly.early_rejection_age_ms",
        )?,
    })
}
