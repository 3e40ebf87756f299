//! What devices say about themselves: status (`devices/{id}/status`) and technical alerts
//! (`devices/{id}/alerts`). Both enter the same alert lifecycle as rule alerts.

use crate::devices::Change;
use crate::model::{CorrelationId, RejectReason, now_micros, now_millis};
use crate::parse::valid_id;
use crate::rules::Priority;
use crate::sources::DeviceContext;
use crate::sources::presence::device_cause;
use serde::Deserialize;

/// A technical alert a device raises or clears about itself.
#[derive(Debug, Deserialize)]
struct DeviceAlert {
    /// `^[a-z0-9_]{1,64}$`, e.g. `lead_off`, `low_battery`, `sensor_fault`.
    code: String,
    priority: Priority,
    /// Shown to clinicians; the code when absent.
    #[serde(default)]
    message: Option<String>,
    /// `false` clears the alert.
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    patient_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

fn yes() -> bool {
    true
}

fn valid_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `devices/{id}/status`: `online` or `offline`, as a plain string or `{"status": …}`.
pub fn status(ctx: &DeviceContext, source: u16, device: &str, payload: &[u8]) {
    let received_us = now_micros();
    let text = std::str::from_utf8(payload).unwrap_or("").trim();
    let value = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => {
            o.get("status").and_then(|s| s.as_str()).map(str::to_string)
        }
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => Some(text.to_string()),
    };
    let (Some(device), Some(online)) = (
        valid_id(device),
        match value.as_deref() {
            Some("online") => Some(true),
            Some("offline") => Some(false),
            _ => None,
        },
    ) else {
        return ctx.reject(source, RejectReason::BadStatus, payload, received_us);
    };
    match ctx.registry.announce(&device, online, now_millis()) {
        Change::WentOffline => {
            tracing::warn!(device = %device, "device reported offline");
            ctx.reported_offline(&device);
        }
        Change::CameOnline => ctx.came_online(&device),
        Change::Unchanged => {}
    }
}

/// `devices/{id}/alerts`: `{"code", "priority", "message"?, "active"?, "patient_id"?}`.
///
/// The alert is the patient's the device is assigned to, or the device's own when it has no
/// assignment: a device speaks for its own bedside only, so a `patient_id` that names
/// another patient is ignored (and logged), never trusted.
pub fn alert(ctx: &DeviceContext, source: u16, device: &str, payload: &[u8]) {
    let received_us = now_micros();
    let parsed = serde_json::from_slice::<DeviceAlert>(payload)
        .ok()
        .filter(|a| valid_code(&a.code));
    let patient = parsed
        .as_ref()
        .map(|a| a.patient_id.as_deref().map(valid_id));
    let (Some(device), Some(alert), Some(patient)) = (valid_id(device), parsed, patient) else {
        return ctx.reject(source, RejectReason::BadDeviceAlert, payload, received_us);
    };
    // A patient id that is present must be valid.
    let patient = match patient {
        Some(None) => {
            return ctx.reject(source, RejectReason::BadDeviceAlert, payload, received_us);
        }
        Some(Some(p)) => Some(p),
        None => None,
    };
    // A known device's message shows it is there; an unknown one does not enter the
    // registry (only an accepted reading does that).
    if ctx.registry.get(&device).is_some() {
        ctx.heard(&device, now_millis());
    }
    let correlation = match alert.correlation_id.as_deref().and_then(valid_id) {
        Some(id) => CorrelationId::Given(id),
        None => CorrelationId::Given(format!("{device}-{}", alert.code).into()),
    };
    let message = alert.message.as_deref().unwrap_or(&alert.code);
    let cause = device_cause(&alert.code, alert.priority, message);
    let assigned = ctx.assignments.patient_of(&device);
    if patient.is_some() && patient != assigned {
        tracing::warn!(
            device = %device, named = ?patient, assigned = ?assigned,
            "device alert names a patient the device is not assigned to; the assignment holds"
        );
    }
    ctx.technical(&device, assigned, cause, alert.active, correlation);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertBook;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    #[test]
    fn a_device_alert_is_its_assigned_patients_whatever_it_names() {
        let (tx, _events) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::default());
        let ctx = DeviceContext {
            book: Arc::new(AlertBook::new(tx, metrics.clone())),
            registry: Default::default(),
            metrics,
            dead_letter: None,
            assignments: Default::default(),
        };
        ctx.assignments.assign("mon-1".into(), "pp-1".into());
        let raise = |device: &str, patient: &str| {
            let body =
                format!(r#"{{"code":"lead_off","priority":"high","patient_id":"{patient}"}}"#);
            alert(&ctx, 0, device, body.as_bytes());
        };
        let patient_of = |device: &str| {
            let active = ctx.book.active();
            let a = active
                .iter()
                .find(|a| &*a.trigger.device_id == device)
                .unwrap();
            a.patient_id.as_deref().map(str::to_string)
        };
        // An assigned device naming another patient: the alert is its own patient's.
        raise("mon-1", "pp-2");
        assert_eq!(patient_of("mon-1").as_deref(), Some("pp-1"));
        // An unassigned device: the alert is the device's own, for no patient.
        raise("mon-9", "pp-2");
        assert_eq!(patient_of("mon-9"), None);
    }
}
