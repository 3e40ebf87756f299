//! The device registry: which devices are online, and when each was last heard from.
//! Sources update it (MQTT status messages, any message at all); readers (REST, the
//! offline check) see a consistent snapshot per device.

use crate::model::{Id, Millis};
use dashmap::DashMap;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    pub online: bool,
    /// Last time anything was heard from the device, ms since the epoch.
    pub last_seen: Millis,
    /// When `online` last changed.
    pub changed_at: Millis,
}

/// What an update did to a device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    CameOnline,
    WentOffline,
}

#[derive(Debug, Default)]
pub struct DeviceRegistry {
    devices: DashMap<Id, DeviceStatus>,
}

impl DeviceRegistry {
    /// The device was heard from: it is online.
    pub fn seen(&self, device: &str, now: Millis) -> Change {
        self.set(device, true, now, true)
    }

    /// The device announced its status (a status message or its last will).
    pub fn announce(&self, device: &str, online: bool, now: Millis) -> Change {
        self.set(device, online, now, online)
    }

    fn set(&self, device: &str, online: bool, now: Millis, heard: bool) -> Change {
        if let Some(mut status) = self.devices.get_mut(device) {
            if heard {
                status.last_seen = status.last_seen.max(now);
            }
            if status.online == online {
                return Change::Unchanged;
            }
            status.online = online;
            status.changed_at = now;
            return if online {
                Change::CameOnline
            } else {
                Change::WentOffline
            };
        }
        self.devices.insert(
            device.into(),
            DeviceStatus {
                online,
                last_seen: now,
                changed_at: now,
            },
        );
        if online {
            Change::CameOnline
        } else {
            Change::WentOffline
        }
    }

    /// Marks offline every online device silent since before `cutoff`; returns them.
    pub fn expire(&self, cutoff: Millis, now: Millis) -> Vec<Id> {
        let mut gone = Vec::new();
        for mut entry in self.devices.iter_mut() {
            if entry.online && entry.last_seen < cutoff {
                entry.online = false;
                entry.changed_at = now;
                gone.push(entry.key().clone());
            }
        }
        gone
    }

    /// Every known device, sorted by id.
    pub fn list(&self) -> Vec<(Id, DeviceStatus)> {
        let mut all: Vec<(Id, DeviceStatus)> = self
            .devices
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn get(&self, device: &str) -> Option<DeviceStatus> {
        self.devices.get(device).map(|s| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_offline_and_expiry() {
        let r = DeviceRegistry::default();
        assert_eq!(r.seen("a", 1_000), Change::CameOnline);
        assert_eq!(r.seen("a", 2_000), Change::Unchanged);
        assert_eq!(r.announce("a", false, 2_500), Change::WentOffline);
        assert_eq!(
            r.get("a").unwrap().last_seen,
            2_000,
            "an announcement is not data"
        );
        assert_eq!(r.seen("a", 3_000), Change::CameOnline);
        assert_eq!(r.seen("b", 3_000), Change::CameOnline);
        assert_eq!(r.expire(2_500, 10_000), Vec::<Id>::new());
        r.seen("b", 9_000);
        assert_eq!(r.expire(5_000, 10_000), vec![Id::from("a")]);
        assert!(!r.get("a").unwrap().online);
        assert!(r.expire(5_000, 10_000).is_empty(), "expired once");
    }
}
