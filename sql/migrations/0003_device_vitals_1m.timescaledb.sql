-- vitalstream: no-transaction
-- One-minute buckets per device, kept up to date by TimescaleDB (a continuous aggregate
-- cannot be created inside a transaction).
CREATE MATERIALIZED VIEW device_vitals_1m WITH (timescaledb.continuous) AS
SELECT time_bucket('1 minute', time) AS bucket,
       device_id,
       patient_id,
       count(*) AS readings,
       avg(hr) AS hr, avg(spo2) AS spo2, avg(temp) AS temp,
       avg(sys_bp) AS sys_bp, avg(dia_bp) AS dia_bp, avg(rr) AS rr
FROM device_vitals
GROUP BY 1, device_id, patient_id
WITH NO DATA;
SELECT add_continuous_aggregate_policy('device_vitals_1m',
    start_offset => INTERVAL '2 hours',
    end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
