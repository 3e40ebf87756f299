-- Wide heart-rate swing: highest and lowest heart rate within 30 s at least 40 bpm apart
-- (arrhythmia, or a lead coming loose). Window: 30 s tumbling (pipelines/analyst.toml).
SELECT device_id, patient_id, max(hr) - min(hr) AS value
FROM vitals
GROUP BY device_id, patient_id
HAVING max(hr) - min(hr) >= 40
