//! The device registry: which devices are online, and when each was last heard from.
//! Sources update it (MQTT status messages, any message at all); readers (REST, the
//! offline check) see a consistent snapshot per device.

use crate::model::{Id, Millis};
use dashmap::DashMap;
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;

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

/// How many devices the registry keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Devices kept at most; a new device past this is not tracked (counted and logged).
    pub max_devices: usize,
    /// An offline device is forgotten this long after it went offline.
    pub forget_after: Millis,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_devices: 20_000,
            forget_after: 24 * 3_600_000,
        }
    }
}

/// The state of offline alarms, behind one lock ([`DeviceRegistry::outages`]).
#[derive(Debug, Default)]
pub struct Outages {
    /// Sources whose aggregated mass-disconnect alarm is active.
    pub mass_alarms: std::collections::BTreeSet<Id>,
    /// When devices were last folded into a mass disconnect, ms.
    pub last_fold: Option<Millis>,
    /// Devices that said they are offline since the last sweep: the sweep alarms them,
    /// with the silent ones, so a mass of last wills is one alarm too.
    pub reported: Vec<Id>,
}

/// What one sweep of [`DeviceRegistry::expire`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Online devices silent past the cutoff, now offline.
    pub offline: Vec<Id>,
    /// Devices offline for longer than `forget_after`, now removed.
    pub forgotten: usize,
}

/// The registry is bounded: a device enters it only through an accepted reading (see
/// [`DeviceRegistry::seen`]), at most `max_devices` are kept, and a device offline for longer
/// than `forget_after` is forgotten. Devices that went offline together in one mass
/// disconnect are marked as such ([`DeviceRegistry::mark_mass_offline`]); the registry
/// counts how many of them are still offline, so one aggregated technical alarm can stand
/// for all of them.
#[derive(Debug, Default)]
pub struct DeviceRegistry {
    devices: DashMap<Id, DeviceStatus>,
    /// Devices of a mass disconnect that are still offline (and still known).
    mass: DashMap<Id, ()>,
    /// Offline alarms in the making; taken by whoever raises or clears one, so a sweep and a
    /// device coming back are never interleaved.
    outages: std::sync::Mutex<Outages>,
    limits: std::sync::OnceLock<RegistryLimits>,
    /// New devices not tracked because the registry was full.
    untracked: std::sync::atomic::AtomicU64,
    /// Where changes go, once someone listens.
    listener: std::sync::OnceLock<crossbeam_channel::Sender<DeviceEvent>>,
}

impl DeviceRegistry {
    /// A registry with these limits.
    pub fn with_limits(limits: RegistryLimits) -> Self {
        let registry = DeviceRegistry::default();
        let _ = registry.limits.set(limits);
        registry
    }

    fn limits(&self) -> RegistryLimits {
        self.limits.get().copied().unwrap_or_default()
    }

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

    /// The device sent an accepted reading: it is online. The only way a device enters the
    /// registry; a new device past `max_devices` is counted, not kept.
    pub fn seen(&self, device: &str, now: Millis) -> Change {
        let change = self.set(device, true, now, true);
        self.emit_change(device, change, now)
    }

    /// The device announced its status (a status message or its last will). A device the
    /// registry does not know (it never sent an accepted reading) is not added.
    pub fn announce(&self, device: &str, online: bool, now: Millis) -> Change {
        if !self.devices.contains_key(device) {
            return Change::Unchanged;
        }
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
                drop(status);
                self.mass.remove(device);
                Change::CameOnline
            } else {
                Change::WentOffline
            };
        }
        let limits = self.limits();
        if self.devices.len() >= limits.max_devices {
            if self.untracked.fetch_add(1, Relaxed) == 0 {
                tracing::error!(
                    max_devices = limits.max_devices,
                    device,
                    "device registry full: new devices are not tracked (their readings are still \
                     evaluated and stored); see the devices_untracked metric"
                );
            }
            return Change::Unchanged;
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

    /// Marks offline every online device silent since before `cutoff`, and forgets devices
    /// offline for longer than `forget_after`.
    pub fn expire(&self, cutoff: Millis, now: Millis) -> Sweep {
        let mut sweep = Sweep::default();
        let forget_before = now.saturating_sub(self.limits().forget_after);
        self.devices.retain(|device, status| {
            if status.online && status.last_seen < cutoff {
                status.online = false;
                status.changed_at = now;
                sweep.offline.push(device.clone());
            } else if !status.online && status.changed_at < forget_before {
                sweep.forgotten += 1;
                self.mass.remove(device);
                return false;
            }
            true
        });
        for device in &sweep.offline {
            self.emit(DeviceEvent::Offline {
                device_id: device.clone(),
                at: now,
            });
        }
        sweep
    }

    /// These devices went offline in one mass disconnect: one aggregated alarm stands for
    /// them until [`DeviceRegistry::mass_offline`] is zero. A device already back online is
    /// left out (checked under its entry's lock, so it cannot come back in between).
    pub fn mark_mass_offline(&self, devices: &[Id]) {
        for device in devices {
            if let Some(status) = self.devices.get(device)
                && !status.online
            {
                self.mass.insert(device.clone(), ());
            }
        }
    }

    /// The offline alarms' state; hold it while raising or clearing one.
    pub fn outages(&self) -> std::sync::MutexGuard<'_, Outages> {
        self.outages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many devices of a mass disconnect are still offline and known.
    pub fn mass_offline(&self) -> usize {
        self.mass.len()
    }

    /// New devices not tracked because the registry was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Relaxed)
    }

    /// How many devices are known.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
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
        assert_eq!(r.expire(2_500, 10_000), Sweep::default());
        r.seen("b", 9_000);
        assert_eq!(r.expire(5_000, 10_000).offline, vec![Id::from("a")]);
        assert!(!r.get("a").unwrap().online);
        assert_eq!(r.expire(5_000, 10_000), Sweep::default(), "expired once");
    }

    #[test]
    fn only_heard_devices_enter_and_the_registry_is_bounded() {
        let r = DeviceRegistry::with_limits(RegistryLimits {
            max_devices: 2,
            forget_after: 60_000,
        });
        assert_eq!(r.announce("ghost", true, 1_000), Change::Unchanged);
        assert_eq!(r.announce("ghost", false, 1_000), Change::Unchanged);
        assert!(r.get("ghost").is_none(), "a status alone does not register");
        assert_eq!(r.seen("a", 1_000), Change::CameOnline);
        assert_eq!(r.seen("b", 1_000), Change::CameOnline);
        assert_eq!(r.seen("c", 1_000), Change::Unchanged, "full");
        assert_eq!((r.len(), r.untracked()), (2, 1));
        assert_eq!(
            r.seen("a", 2_000),
            Change::Unchanged,
            "known devices still update"
        );
        // Offline at 10 s, forgotten a minute later; then there is room again.
        assert_eq!(r.expire(5_000, 10_000).offline.len(), 2);
        assert_eq!(r.expire(5_000, 69_999).forgotten, 0);
        assert_eq!(r.expire(5_000, 70_001).forgotten, 2);
        assert!(r.is_empty());
        assert_eq!(r.seen("c", 71_000), Change::CameOnline);
    }

    #[test]
    fn a_mass_disconnect_is_counted_until_its_devices_return_or_are_forgotten() {
        let r = DeviceRegistry::with_limits(RegistryLimits {
            max_devices: 10,
            forget_after: 60_000,
        });
        for d in ["a", "b", "c"] {
            r.seen(d, 1_000);
        }
        let gone = r.expire(5_000, 10_000).offline;
        r.mark_mass_offline(&gone);
        assert_eq!(r.mass_offline(), 3);
        assert_eq!(r.seen("a", 11_000), Change::CameOnline);
        assert_eq!(r.mass_offline(), 2);
        assert_eq!(r.expire(0, 80_000).forgotten, 2);
        assert_eq!(r.mass_offline(), 0);
    }
}
