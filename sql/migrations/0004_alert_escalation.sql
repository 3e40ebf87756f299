-- Escalation: a firing alert left unacknowledged is escalated, level by level.

ALTER TABLE alerts DROP CONSTRAINT alerts_state_check;
ALTER TABLE alerts ADD CONSTRAINT alerts_state_check
    CHECK (state IN ('pending', 'firing', 'escalated', 'acknowledged', 'resolved'));
-- How many times it was escalated (0: never), and when last.
ALTER TABLE alerts ADD COLUMN escalation integer NOT NULL DEFAULT 0;
ALTER TABLE alerts ADD COLUMN escalated_at timestamptz;
-- Ranks are now 1 raised, 2 escalated, 3 acknowledged, 4 resolved.
UPDATE alerts SET state_rank = state_rank + 1 WHERE state_rank >= 2;

-- An alert is escalated once per level: one event row each.
ALTER TABLE alert_events DROP CONSTRAINT alert_events_event_check;
ALTER TABLE alert_events ADD CONSTRAINT alert_events_event_check
    CHECK (event IN ('raised', 'escalated', 'acknowledged', 'resolved'));
ALTER TABLE alert_events ADD COLUMN level integer NOT NULL DEFAULT 0;
ALTER TABLE alert_events DROP CONSTRAINT alert_events_pkey;
ALTER TABLE alert_events ADD PRIMARY KEY (alert_id, event, level);
