-- Desaturation trend: SpO2 averaged over the last 20 s of the window is at least 3 points
-- below its average over the first 20 s, and under 94 %. A slow fall that a fixed
-- threshold would only catch once the patient is already hypoxic.
-- Window: 60 s, sliding every 10 s (pipelines/analyst.toml).
SELECT device_id, patient_id, late_avg AS value
FROM (
    SELECT device_id, patient_id,
           avg(spo2) FILTER (WHERE ts < window_start + INTERVAL '20 seconds') AS early_avg,
           avg(spo2) FILTER (WHERE ts >= window_end - INTERVAL '20 seconds') AS late_avg
    FROM vitals
    GROUP BY device_id, patient_id
) AS halves
WHERE early_avg - late_avg >= 3 AND late_avg < 94
