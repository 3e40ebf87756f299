-- One-minute buckets per device. On plain PostgreSQL a view computed at query time, with the
-- same name and columns as TimescaleDB's continuous aggregate.
CREATE VIEW device_vitals_1m AS
SELECT date_bin('1 minute', time, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS bucket,
       device_id,
       patient_id,
       count(*) AS readings,
       avg(hr) AS hr, avg(spo2) AS spo2, avg(temp) AS temp,
       avg(sys_bp) AS sys_bp, avg(dia_bp) AS dia_bp, avg(rr) AS rr
FROM device_vitals
GROUP BY 1, device_id, patient_id;
