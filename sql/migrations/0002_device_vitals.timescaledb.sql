-- Readings on TimescaleDB: a hypertable with one-day chunks, compressed by device.
-- Compression and retention policies are set by the writer from its configuration.
-- Ids are ASCII (the parser sees to it) and compared bytewise ("C").
CREATE TABLE device_vitals (
    time        timestamptz NOT NULL,
    device_id   text COLLATE "C" NOT NULL,
    patient_id  text COLLATE "C",
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
    -- No index on patient_id: a second index halves the ingest rate. A patient's readings
    -- are found through patient_devices and this key.
);
SELECT create_hypertable('device_vitals', by_range('time', INTERVAL '1 day'));
ALTER TABLE device_vitals SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
