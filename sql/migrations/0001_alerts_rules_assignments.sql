-- Alerts, rule definitions and device assignments: the same on TimescaleDB and PostgreSQL.

-- Current state of every alert, one row per alert, updated by each lifecycle transition.
CREATE TABLE alerts (
    alert_id        text PRIMARY KEY,
    rule_id         text NOT NULL,
    priority        text NOT NULL CHECK (priority IN ('low', 'medium', 'high')),
    message         text NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'firing', 'acknowledged', 'resolved')),
    -- The patient, or the device when the device has no patient.
    subject         text NOT NULL,
    patient_id      text,
    device_id       text NOT NULL,
    -- The vital's value, or the window's aggregate.
    value           double precision,
    window_start    timestamptz,
    window_end      timestamptz,
    correlation_id  text NOT NULL,
    -- Event time of the reading (threshold rules) or the window's end (window rules).
    event_time      timestamptz NOT NULL,
    raised_at       timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at     timestamptz,
    resolved_by     text,
    updated_at      timestamptz NOT NULL,
    -- 1 raised, 2 acknowledged, 3 resolved: a replayed older transition never moves an alert
    -- back to an earlier state.
    state_rank      smallint NOT NULL
);
CREATE INDEX alerts_patient_raised ON alerts (patient_id, raised_at DESC);
CREATE INDEX alerts_state_raised ON alerts (state, raised_at DESC);

-- Every lifecycle transition, as it happened.
CREATE TABLE alert_events (
    alert_id        text NOT NULL,
    event           text NOT NULL CHECK (event IN ('raised', 'acknowledged', 'resolved')),
    at              timestamptz NOT NULL,
    rule_id         text NOT NULL,
    priority        text NOT NULL,
    patient_id      text,
    device_id       text NOT NULL,
    value           double precision,
    correlation_id  text NOT NULL,
    -- Who acknowledged or resolved it; NULL when the engine did.
    actor           text,
    -- One of each per alert: a replayed stream (same alert ids) adds nothing.
    PRIMARY KEY (alert_id, event)
);
CREATE INDEX alert_events_at ON alert_events (at);

-- Rule definitions submitted at runtime (REST, SQL rules), so they survive a restart.
CREATE TABLE rules (
    rule_id     text PRIMARY KEY,
    kind        text NOT NULL,
    definition  jsonb NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    version     integer NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text
);

-- Which devices reported readings for which patient, per UTC day: written by the storage
-- writer with the readings, so a patient's readings are found by device and time (the key
-- of device_vitals) without a second index on every reading.
CREATE TABLE patient_devices (
    patient_id  text COLLATE "C" NOT NULL,
    day         date NOT NULL,
    device_id   text COLLATE "C" NOT NULL,
    PRIMARY KEY (patient_id, day, device_id)
);

-- Which device was attached to which patient, and when. valid_to NULL = still attached.
CREATE TABLE device_assignments (
    device_id   text NOT NULL,
    patient_id  text NOT NULL,
    valid_from  timestamptz NOT NULL,
    valid_to    timestamptz,
    assigned_by text,
    PRIMARY KEY (device_id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE UNIQUE INDEX device_assignments_current ON device_assignments (device_id) WHERE valid_to IS NULL;
CREATE INDEX device_assignments_patient ON device_assignments (patient_id, valid_from DESC);
