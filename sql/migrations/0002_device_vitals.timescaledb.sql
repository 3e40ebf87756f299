-- Readings on TimescaleDB: a hypertable with one-day chunks, compressed by device.
-- Compression and retention policies are set by the writer from its configuration.
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
);
SELECT create_hypertable('device_vitals', by_range('time', INTERVAL '1 day'));
CREATE INDEX device_vitals_patient_time ON device_vitals (patient_id, time DESC);
ALTER TABLE device_vitals SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
