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

/// A change other services hear about (`device.events` on Kafka).
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    Online {
        device_id: Id,
        at: Millis,
    },
    Offline {
        device_id: Id,
        at: Millis,
    },
    /// Assigned to a patient, or released (`patient_id: None`).
    Assigned {
        device_id: Id,
        patient_id: Option<Id>,
        by: String,
        at: Millis,
    },
}

#[derive(Debug, Default)]
pub struct DeviceRegistry {
    devices: DashMap<Id, DeviceStatus>,
    /// Where changes go, once someone listens.
    listener: std::sync::OnceLock<crossbeam_channel::Sender<DeviceEvent>>,
}

impl DeviceRegistry {
    /// Changes from now on; only the first caller gets them.
    pub fn listen(&self) -> Option<crossbeam_channel::Receiver<DeviceEvent>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.listener.set(tx).ok().map(|()| rx)
    }

    fn emit(&self, event: DeviceEvent) {
        if let Some(tx) = self.listener.get() {
            let _ = tx.send(event);
        }
    }

    fn emit_change(&self, device: &str, change: Change, now: Millis) -> Change {
        match change {
            Change::CameOnline => self.emit(DeviceEvent::Online {
                device_id: device.into(),
                at: now,
            }),
            Change::WentOffline => self.emit(DeviceEvent::Offline {
                device_id: device.into(),
                at: now,
            }),
            Change::Unchanged => {}
        }
        change
    }

    /// A device was assigned to a patient (or released): tells the listener.
    pub fn assigned(&self, device: &str, patient: Option<&str>, by: &str, now: Millis) {
        self.emit(DeviceEvent::Assigned {
            device_id: device.into(),
            patient_id: patient.map(Id::from),
            by: by.to_string(),
            at: now,
        });
    }

    /// The device was heard from: it is online.
    pub fn seen(&self, device: &str, now: Millis) -> Change {
        let change = self.set(device, true, now, true);
        self.emit_change(device, change, now)
    }

    /// The device announced its status (a status message or its last will).
    pub fn announce(&self, device: &str, online: bool, now: Millis) -> Change {
        let change = self.set(device, online, now, online);
        self.emit_change(device, change, now)
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
        for device in &gone {
            self.emit(DeviceEvent::Offline {
                device_id: device.clone(),
                at: now,
            });
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
