//! The platform's device topics: `devices/{device_id}/{vitals|alerts|status|commands}`.

/// What a device topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Vitals,
    Alerts,
    Status,
    Commands,
}

/// Splits a device topic into its device id segment and kind. The id segment is returned as
/// it stands (the parser validates it like any device id); a topic of another shape is `None`.
pub fn parse_topic(topic: &str) -> Option<(&str, TopicKind)> {
    let mut parts = topic.split('/');
    let (Some("devices"), Some(device), Some(kind), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let kind = match kind {
        "vitals" => TopicKind::Vitals,
        "alerts" => TopicKind::Alerts,
        "status" => TopicKind::Status,
        "commands" => TopicKind::Commands,
        _ => return None,
    };
    Some((device, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics() {
        assert_eq!(
            parse_topic("devices/bed-1/vitals"),
            Some(("bed-1", TopicKind::Vitals))
        );
        assert_eq!(
            parse_topic("devices/bed-1/status"),
            Some(("bed-1", TopicKind::Status))
        );
        assert_eq!(
            parse_topic("devices/x*y/vitals"),
            Some(("x*y", TopicKind::Vitals))
        );
        assert_eq!(parse_topic("devices/bed-1/vitals/extra"), None);
        assert_eq!(parse_topic("devices/bed-1/other"), None);
        assert_eq!(parse_topic("sensors/bed-1/vitals"), None);
        assert_eq!(parse_topic("devices/bed-1"), None);
    }
}
