-- Readings on plain PostgreSQL: a table partitioned by day on time. The writer creates the
-- day partitions ahead of time (and on demand for older data), named device_vitals_pYYYYMMDD.
CREATE TABLE device_vitals (
    time        timestamptz NOT NULL,
    device_id   text NOT NULL,
    patient_id  text,
    hr          double precision,
    spo2        double precision,
    temp        double precision,
    sys_bp      double precision,
    dia_bp      double precision,
    rr          double precision,
    seq         bigint,
    received_at timestamptz NOT NULL,
    -- A retried batch or a replayed stream never stores a reading twice.
    PRIMARY KEY (device_id, time)
) PARTITION BY RANGE (time);
CREATE INDEX device_vitals_patient_time ON device_vitals (patient_id, time DESC);
