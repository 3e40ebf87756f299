//! Which devices are present: the device registry, fed by accepted readings, and the
//! technical alarms for devices that go silent.
//!
//! A device enters the registry only when the engine accepts one of its readings (a
//! malformed id or payload never does), the registry is bounded, and a mass disconnect —
//! many devices going silent in one sweep, as when a network segment or the broker fails —
//! raises one aggregated technical alarm instead of one per device.

use super::DeviceContext;
use crate::alerts::{Cause, Signal, Trigger};
use crate::devices::{Change, Outages};
use crate::model::{CorrelationId, Id, now_micros, now_millis};
use crate::rules::Priority;
use crate::rules::threshold::Edge;

/// The rule id of the aggregated alarm for a mass disconnect.
pub const MASS_OFFLINE: &str = "source.devices_offline";

/// The cause of a device's technical alert: `device.<code>`.
pub(crate) fn device_cause(code: &str, priority: Priority, message: &str) -> Cause {
    Cause {
        id: format!("device.{code}").into(),
        priority,
        message: message.into(),
    }
}

impl DeviceContext {
    /// Raises or clears a technical alert about `device`.
    pub(crate) fn technical(
        &self,
        device: &Id,
        patient: Option<Id>,
        cause: Cause,
        active: bool,
        correlation_id: CorrelationId,
    ) {
        self.book.signal(Signal {
            cause,
            patient_id: patient,
            edge: if active { Edge::Raise } else { Edge::Clear },
            trigger: Trigger {
                device_id: device.clone(),
                value: f64::NAN,
                window: None,
                correlation_id,
                event_ts: now_millis(),
            },
            received_us: now_micros(),
            quiet: false,
        });
    }

    /// The technical alert a device raises by going offline.
    pub(crate) fn offline(&self, device: &Id, active: bool, why: &str) {
        let correlation = CorrelationId::Given(device.clone());
        let cause = device_cause("offline", Priority::Medium, why);
        self.technical(device, None, cause, active, correlation);
    }

    /// The engine accepted a reading of `device` (a valid id): it is present.
    pub fn heard(&self, device: &Id, now: crate::model::Millis) {
        if self.registry.seen(device, now) == Change::CameOnline {
            self.came_online(device);
        }
    }

    /// A device is back (a reading, or its status): clears its own offline alarm if it had
    /// one (a device of a mass disconnect has none), and the aggregated one when it was the
    /// last of those to return.
    pub(crate) fn came_online(&self, device: &Id) {
        let mut outages = self.registry.outages();
        self.offline(device, false, "Device back online");
        self.mass_offline_changed(&mut outages);
    }

    /// A device said it is offline (its status, or its last will): alarmed at the next
    /// sweep, with the silent ones, so the last wills of a whole ward are one alarm too.
    pub(crate) fn reported_offline(&self, device: &Id) {
        self.registry.outages().reported.push(device.clone());
    }

    /// Devices silent past `offline_after_ms`, and those that said they are offline, go
    /// offline. `storm` or more in one sweep — or any while the last mass disconnect is less
    /// than `offline_after_ms` old — are folded into one aggregated alarm on `source`, which
    /// clears when the last of them is back (or forgotten); fewer raise an alarm each.
    pub fn expire_silent(&self, offline_after_ms: i64, storm: usize, source: &Id) {
        let now = now_millis();
        let mut outages = self.registry.outages();
        let sweep = self.registry.expire(now - offline_after_ms, now);
        if sweep.forgotten > 0 {
            tracing::info!(
                forgotten = sweep.forgotten,
                "devices offline for long forgotten"
            );
            self.mass_offline_changed(&mut outages);
        }
        let mut gone = sweep.offline;
        // A device that said it was offline and has been heard since is not alarmed.
        let reported = std::mem::take(&mut outages.reported);
        gone.extend(
            (reported.into_iter()).filter(|d| self.registry.get(d).is_some_and(|s| !s.online)),
        );
        if gone.is_empty() {
            return;
        }
        let storm_open = !outages.mass_alarms.is_empty()
            && outages
                .last_fold
                .is_some_and(|t| now - t < offline_after_ms);
        if gone.len() < storm && !storm_open {
            for device in &gone {
                tracing::warn!(device = %device, "device offline");
                self.offline(device, true, "Device offline: no data");
            }
            return;
        }
        self.registry.mark_mass_offline(&gone);
        // Only a mass disconnect itself opens the window stragglers are folded in within:
        // devices trickling away one by one after it are alarmed each.
        if gone.len() >= storm {
            outages.last_fold = Some(now);
        }
        let examples: Vec<&str> = gone.iter().take(5).map(|d| &**d).collect();
        tracing::warn!(
            devices = gone.len(),
            still_offline = self.registry.mass_offline(),
            ?examples,
            "many devices went offline at once: one aggregated technical alarm"
        );
        if !outages.mass_alarms.insert(source.clone()) {
            return; // folded into the alarm already raised
        }
        let message = format!(
            "{} devices went offline at once (e.g. {}): network or broker fault?",
            gone.len(),
            examples.join(", ")
        );
        let cause = Cause {
            id: MASS_OFFLINE.into(),
            priority: Priority::Medium,
            message: message.into(),
        };
        let correlation = CorrelationId::Given(source.clone());
        self.technical(source, None, cause, true, correlation);
    }

    /// Clears the aggregated alarms once no device of a mass disconnect is still offline.
    fn mass_offline_changed(&self, outages: &mut Outages) {
        if self.registry.mass_offline() > 0 || outages.mass_alarms.is_empty() {
            return;
        }
        tracing::info!("every device of the mass disconnect is back or forgotten");
        for source in std::mem::take(&mut outages.mass_alarms) {
            let cause = Cause {
                id: MASS_OFFLINE.into(),
                priority: Priority::Medium,
                message: "Devices back online".into(),
            };
            let correlation = CorrelationId::Given(source.clone());
            self.technical(&source, None, cause, false, correlation);
        }
    }
}
