//! The in-process bus of rules versions: under `access all` every role of the process shares one,
//! so a rule change made by the entitlements role reaches the gateway's and the stream's rules
//! mirrors without Redis (`docs/contracts.md`, Entitlement vocabulary). Separate processes
//! (and separate roles started by tests) each have their own and follow Redis instead.
//!
//! Only the newest version matters to a follower, so the bus is a `watch` channel that only
//! moves forward: a slow follower skips versions instead of queueing them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::watch;

/// The newest rules version this process has heard of (`-1`: none yet), and where each role of
/// the process stands (the replica board without Redis).
#[derive(Clone)]
pub struct RulesBus {
    tx: watch::Sender<i64>,
    /// Reports by `<role>:<replica>`; a std mutex held for one insert or one copy.
    reports: Arc<Mutex<BTreeMap<String, Value>>>,
}

impl Default for RulesBus {
    fn default() -> Self {
        RulesBus { tx: watch::channel(-1).0, reports: Arc::default() }
    }
}

impl RulesBus {
    /// Announces `version`; an older or equal one changes nothing.
    pub fn announce(&self, version: i64) {
        self.tx.send_if_modified(|current| {
            let newer = version > *current;
            if newer {
                *current = version;
            }
            newer
        });
    }

    /// Follows the announcements.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.tx.subscribe()
    }

    /// The newest version announced.
    pub fn latest(&self) -> i64 {
        *self.tx.borrow()
    }

    /// Records where a replica stands.
    pub fn report(&self, replica: String, report: Value) {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).insert(replica, report);
    }

    /// Every report.
    pub fn reports(&self) -> Vec<(String, Value)> {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_move_forward() {
        let bus = RulesBus::default();
        let mut rx = bus.subscribe();
        bus.announce(3);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        bus.announce(2);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(bus.latest(), 3);
    }
}
