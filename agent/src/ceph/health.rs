//! What the monitors say is wrong with the cluster (`ceph health`), to explain an RBD call that
//! did not answer: a full cluster or pool makes every write wait instead of failing, and the
//! caller sees only a timeout.

use std::time::Duration;

use serde::Deserialize;

/// How long the question may take: it follows a call that already waited its whole bound.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The monitor command `ceph health --format json` sends.
pub const HEALTH_COMMAND: &str = r#"{"prefix": "health", "format": "json"}"#;

/// The checks the monitors report as failing, by code (`POOL_FULL`), with their summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    checks: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    checks: std::collections::BTreeMap<String, Check>,
}

#[derive(Deserialize)]
struct Check {
    summary: Summary,
    #[serde(default)]
    muted: bool,
}

#[derive(Deserialize)]
struct Summary {
    message: String,
}

impl Health {
    /// Reads the JSON of `ceph health`; `None` when it is not that.
    pub fn parse(json: &str) -> Option<Health> {
        let report: Report = serde_json::from_str(json).ok()?;
        let checks = report.checks.into_iter().filter(|(_, c)| !c.muted).map(|(code, c)| (code, c.summary.message));
        Some(Health { checks: checks.collect() })
    }

    /// Whether a check says the cluster, an OSD or a pool is full: writes then wait.
    fn full(&self) -> bool {
        self.checks.iter().any(|(code, _)| code.ends_with("_FULL"))
    }

    /// Why a call may not have answered, and what to do about it: the hint of a timeout.
    pub fn explain(health: Option<&Health>) -> String {
        match health {
            Some(h) if h.full() => format!(
                "the cluster reports {h}: writes wait until there is room; remove images or snapshots, add OSDs, \
                 or raise the pool's quota"
            ),
            Some(h) if !h.checks.is_empty() => format!("the cluster reports {h}"),
            Some(_) => "the cluster reports no problem; is it overloaded?".to_owned(),
            None => "is the Ceph cluster reachable?".to_owned(),
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checks: Vec<String> = self.checks.iter().map(|(code, message)| format!("{code} ({message})")).collect();
        f.write_str(&checks.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As a one-OSD cluster answered with a pool over its quota.
    const POOL_FULL: &str = r#"{"status":"HEALTH_WARN","checks":{"POOL_FULL":{"severity":"HEALTH_WARN","summary":{"message":"1 pool(s) full","count":1},"muted":false}},"mutes":[]}"#;

    #[test]
    fn a_full_pool_is_named_with_what_to_do() {
        let h = Health::parse(POOL_FULL).unwrap();
        let text = Health::explain(Some(&h));
        assert!(text.starts_with("the cluster reports POOL_FULL (1 pool(s) full): writes wait"), "{text}");
        assert!(text.contains("raise the pool's quota"), "{text}");
    }

    #[test]
    fn other_checks_are_named_and_muted_ones_left_out() {
        let json = r#"{"status":"HEALTH_WARN","checks":{
            "MON_CLOCK_SKEW":{"severity":"HEALTH_WARN","summary":{"message":"clock skew detected"},"muted":false},
            "OSD_DOWN":{"severity":"HEALTH_WARN","summary":{"message":"1 osds down"},"muted":true}}}"#;
        let h = Health::parse(json).unwrap();
        assert_eq!(Health::explain(Some(&h)), "the cluster reports MON_CLOCK_SKEW (clock skew detected)");
    }

    #[test]
    fn a_healthy_or_unknown_cluster_gets_its_own_hint() {
        let ok = Health::parse(r#"{"status":"HEALTH_OK","checks":{},"mutes":[]}"#).unwrap();
        assert_eq!(Health::explain(Some(&ok)), "the cluster reports no problem; is it overloaded?");
        assert_eq!(Health::parse("HEALTH_OK"), None, "plain text is not the JSON report");
        assert_eq!(Health::explain(None), "is the Ceph cluster reachable?");
    }
}
