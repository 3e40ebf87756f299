//! MQTT: devices publishing to `devices/{device_id}/vitals` (readings), `…/alerts` (their
//! technical alerts) and `…/status` (online/offline, retained, or their last will), over an
//! MQTT 5 session that survives restarts (QoS 1, persistent session, manual
//! acknowledgements); commands go back on `…/commands`.
//!
//! A message is acknowledged to the broker only once the reading it carried is durable
//! (stored, or dead-lettered if it was rejected): until then the broker keeps it and
//! delivers it again after a reconnect, and the engine recognises the redelivery as a
//! duplicate. When the engine is full this source stops reading from the socket, so the
//! broker holds the rest.

mod config;
mod device;
mod source;
mod topic;

pub use config::MqttConfig;
/// What a device says about itself (`…/status`, `…/alerts`), handled as the source does.
pub use device::{alert as device_alert, status as device_status};
pub use source::{CommandError, Commands, MqttSource, MqttStats};
pub use topic::{TopicKind, parse_topic};
